"""The Grafana dashboard: valid against Grafana's schemas, and every query evaluated by promtool
(Prometheus's own PromQL engine) on input series named exactly as the code exports them."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from actors.fleet.metrics import exported_series
from common.metrics import GAUGES
from tests.shared_data import shared_or_skip

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = json.loads((ROOT / "deploy" / "grafana_dashboard.json").read_text())
RUN = "r1"
WORKERS = {"w0": 2.0, "w1": 1.0}  # generated tokens per second each


def schema(name: str) -> dict:
    return json.loads((shared_or_skip("schemas", "grafana") / f"{name}.jsonschema.json").read_text())


def queries() -> list[tuple[str, str, str]]:
    return [(p["title"], t["refId"], t["expr"]) for p in DASHBOARD["panels"] for t in p["targets"]]


def test_the_dashboard_validates_against_grafanas_schemas():
    jsonschema.validate(DASHBOARD, schema("dashboard"))
    ts, prom = schema("timeseries"), schema("prometheus")
    options = {"$ref": "#/definitions/Options", "definitions": ts["definitions"]}
    for panel in DASHBOARD["panels"]:
        assert panel["type"] == "timeseries"
        jsonschema.validate(panel.get("options", {}), options)
        for target in panel["targets"]:
            jsonschema.validate(target, prom)
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def gauge_value(name: str) -> float:
    return float(sorted(GAUGES + tuple(n for n in exported_series())).index(name) + 1)


def input_series() -> list[dict]:
    """Every series the code exports, labelled as Ray exports them (plus Ray's own labels)."""
    ray_labels = 'Component="core_worker",SessionName="s",Version="2.60.0"'
    out = [{"series": f'ray_memr2_{g}{{run="{RUN}",WorkerId="d",{ray_labels}}}', "values": f"{gauge_value(g):g}x20"} for g in GAUGES]
    for name, kind in exported_series().items():
        per_worker = name.startswith("ray_memr2_worker_")
        for worker, tok_s in (WORKERS.items() if per_worker else [("", 0.0)]):
            labels = f'run="{RUN}",{ray_labels}' + (f',worker="{worker}",WorkerId="{worker}"' if worker else ',WorkerId="d"')
            if kind == "gauge":
                values = f"{gauge_value(name):g}x20"
            elif per_worker:
                values = f"0+{tok_s * 60:g}x20"  # a counter sampled every minute
            else:
                values = "0+1x20"  # one failure (retry, duplicate) per minute
            out.append({"series": f"{name}{{{labels}}}", "values": values})
    return out


def expected(expr: str) -> list[dict]:
    """What each query must return for the input above; a query without a rule here fails."""
    run = f'run="{RUN}"'
    if m := re.fullmatch(r'max by \(run\) \((ray_memr2_\w+)\{run=~"\$run"\}\)', expr):
        name = m.group(1)
        return [{"labels": f"{{{run}}}", "value": gauge_value(name.removeprefix("ray_memr2_") if name.removeprefix("ray_memr2_") in GAUGES else name)}]
    if m := re.fullmatch(r'max by \(run, worker\) \((ray_memr2_worker_\w+)\{run=~"\$run"\}\)', expr):
        return [{"labels": f'{{{run},worker="{w}"}}', "value": gauge_value(m.group(1))} for w in WORKERS]
    if re.fullmatch(r'sum by \(run, worker\) \(rate\(ray_memr2_worker_generated_tokens_total\{run=~"\$run"\}\[\$__rate_interval\]\)\)', expr):
        return [{"labels": f'{{{run},worker="{w}"}}', "value": v} for w, v in WORKERS.items()]
    if re.fullmatch(r'sum by \(run\) \(rate\(ray_memr2_worker_generated_tokens_total\{run=~"\$run"\}\[\$__rate_interval\]\)\)', expr):
        return [{"labels": f"{{{run}}}", "value": sum(WORKERS.values())}]
    if re.fullmatch(r'sum by \(run\) \(increase\(ray_memr2_fleet_\w+_total\{run=~"\$run"\}\[5m\]\)\)', expr):
        return [{"labels": f"{{{run}}}", "value": 5.0}]  # one a minute
    raise AssertionError(f"no expectation for dashboard query {expr}")


@pytest.mark.slow
def test_every_dashboard_query_returns_the_exported_series_under_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        why = "promtool not installed (Debian package prometheus; .ci/run installs it)"
        if os.environ.get("MEMR2_CI"):
            pytest.fail(why)
        pytest.skip(why)
    tests = []
    for title, ref, expr in queries():
        concrete = expr.replace("$run", RUN).replace("$__rate_interval", "5m")  # as Grafana fills them in
        tests.append({"expr": concrete, "eval_time": "10m", "exp_samples": expected(expr)})
    spec = {"rule_files": [], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": input_series(), "promql_expr_test": tests}]}
    (tmp_path / "dashboard_test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run([promtool, "test", "rules", str(tmp_path / "dashboard_test.yml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert len(tests) == len(queries()) >= 20
