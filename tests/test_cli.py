"""The memr2 command line as a user runs it: as a console script and as `python -m memr2`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memr2.cli import main
from memory_service.bench import run_memory_bench

ROOT = Path(__file__).resolve().parents[1]
LOCOMO = ROOT.parent / "shared" / "data" / "locomo" / "locomo10.json"


def test_python_dash_m_runs_without_an_install(tmp_path):
    # As under `ray job submit --working-dir .`: only the working directory is importable.
    out = subprocess.run(
        [sys.executable, "-m", "memr2", "data", "stats", str(tmp_path / "missing.json"), "--json"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"memr2: error: {tmp_path / 'missing.json'}: no such data file"]


@pytest.mark.skipif(not LOCOMO.is_file(), reason="LoCoMo is read from ../shared")
def test_data_stats_json(capsys):
    assert main(["data", "stats", str(LOCOMO), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["turns"] == 5882


def test_bench_memory_reports_every_field_per_size():
    result = run_memory_bench((50, 200))
    assert [r["size"] for r in result["results"]] == [50, 200]
    for row in result["results"]:
        assert set(row) == {"size", "fork_us", "deepcopy_us", "pickle_disk_us", "apply_us", "retrieve_us"}
        assert all(v > 0 for v in row.values())
        assert row["fork_us"] < row["deepcopy_us"]  # a fork shares, a deep copy walks every memory


def test_score_command_adds_f1_and_bleu1_and_names_bad_rows(tmp_path, capsys):
    src, out = tmp_path / "pred.jsonl", tmp_path / "scored.jsonl"
    rows = [
        {"question": "Where does Alice live?", "answer": "Denver", "category": 4, "prediction": "in Denver"},
        {"question": "Which cities?", "answer": "Denver, Boston", "category": 1, "prediction": "Boston"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "--in", str(src), "--out", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    # "in Denver" vs "Denver": precision 1/2, recall 1 -> F1 2/3. Multi-hop: best of {1, 0} per gold part -> 1/2.
    assert [round(r["f1"], 12) for r in scored] == [round(2 / 3, 12), 0.5]
    assert all("bleu1" in r and r["question"] == q["question"] for r, q in zip(scored, rows))
    src.write_text(json.dumps({"question": "q", "answer": "a", "category": 4}) + "\n")
    assert main(["score", "--in", str(src), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "line 1: missing field 'prediction'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["rollout", "train"])
@pytest.mark.parametrize("name,why", [
    ("gpt-17", "is neither 'tiny', 'smollm2', a checkpoint directory with config.json nor a hub id"),
    ("nobody/no-such-model", "no such folder here, not in the local hub cache, and the hub is offline (HF_HUB_OFFLINE)"),
])
def test_a_model_name_that_does_not_resolve_is_one_line_before_any_actor_starts(command, name, why, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "memr2", command, f"model.name={name}", f"metrics.run_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"memr2: error: model {name!r}: {why}" if "/" in name else f"memr2: error: model {name!r} {why}"]
    assert not (tmp_path / "ray").exists() and "Ray" not in out.stderr  # no cluster was started
