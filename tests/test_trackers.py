"""metrics.loggers: TensorBoard, W&B (offline) and MLflow receive every metrics.jsonl row, read back
here with each library's own reader (TensorBoard's event accumulator, `wandb leet inspect` on the
offline run file, mlflow.search_runs and the client's metric history) and compared to the jsonl."""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from common.config import load_config
from common.metrics import MetricsLog
from common.trackers import TrackerError, Trackers, scalars

ALL = "metrics.loggers=[jsonl,tensorboard,wandb,mlflow]"


def expected(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl's numbers, key -> step -> value (a validation row shares its step's key space)."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in scalars(row).items():
            out[key][row["step"]] = value
    return dict(out)


def tensorboard_scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def wandb_records(run: Path) -> list[dict]:
    """The offline run's records, decoded by wandb's own inspector (one JSON record per line)."""
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run}"
    records = []
    for f in files:  # a resumed run adds a second offline folder with the same run id
        out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(f)],
                             capture_output=True, text=True, check=True, timeout=120).stdout
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return records


def wandb_scalars(records: list[dict]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for r in records:
        if r.get("type") == "history":
            step = r["history"]["step"]["num"]
            for key, value in r["history"]["item"].items():
                if not key.startswith("_"):
                    out[key][step] = value
    return dict(out)


def mlflow_run(run: Path, name: str):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{run.parent.resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["memr2"], filter_string=f"tags.mlflow.runName = '{name}'", output_format="list")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return mlflow.MlflowClient(), runs[0]


def mlflow_scalars(run: Path, name: str) -> dict[str, dict[int, float]]:
    client, found = mlflow_run(run, name)
    return {key: {m.step: m.value for m in client.get_metric_history(found.info.run_id, key)} for key in found.data.metrics}


def assert_equal_scalars(got: dict, want: dict, tracker: str, rel: float = 0.0) -> None:
    assert set(got) == set(want), f"{tracker}: keys differ: {set(got) ^ set(want)}"
    for key in want:
        assert set(got[key]) == set(want[key]), f"{tracker} {key}: steps {sorted(got[key])} != {sorted(want[key])}"
        for step, value in want[key].items():
            assert got[key][step] == pytest.approx(value, rel=rel, abs=0), f"{tracker} {key}@{step}"


def rows():
    return [
        {"step": 0, "stage": 0, "horizon": 2, "val_f1": 0.25, "val_f1_ci": [0.1, 0.4], "val_questions": 12},
        {"step": 1, "stage": 0, "horizon": 2, "reward_mean": 0.125, "loss": -0.03125, "logp_mismatch": 0.0071,
         "degenerate": True, "worker": "w0", "tokens_per_s": 812.5},
        {"step": 2, "stage": 0, "horizon": 2, "reward_mean": 0.375, "loss": 0.5, "logp_mismatch": float("nan"), "steps": 4.0},
        {"step": 2, "stage": 0, "horizon": 2, "val_f1": 0.5, "val_f1_per_question": [0.5, 0.5], "val_questions": 12},
    ]


def test_every_row_config_and_summary_reach_each_tracker_as_in_metrics_jsonl(tmp_path):
    run = tmp_path / "runs" / "t1"
    run.mkdir(parents=True)
    cfg = load_config(None, [ALL, f"metrics.run_dir={tmp_path / 'runs'}", "metrics.run_name=t1"])
    log = MetricsLog(run / "metrics.jsonl", prometheus=False, trackers=Trackers(cfg, run, "t1"))
    for row in rows():
        log.write(row, "t1")
    log.finish({"run": "t1", "steps": 2, "val_f1_start": 0.25, "val_f1_end": 0.5, "val_f1_gain_ci": [0.0, 0.5]})
    want = expected(run)
    assert "degenerate" not in want and "worker" not in want and "logp_mismatch" in want and 2 not in want["logp_mismatch"]

    assert_equal_scalars(tensorboard_scalars(run), want, "tensorboard", rel=1e-6)  # TensorBoard stores float32
    records = wandb_records(run)
    assert_equal_scalars(wandb_scalars(records), want, "wandb")
    summary = {k: v for r in records if r.get("type") == "summary" for k, v in r["summary"]["update"].items()}
    # The summary's "steps" (the run's) outlives the rows' (an update's optimizer steps) in W&B too.
    assert summary["val_f1_end"] == 0.5 and summary["tracker_errors"] == 0 and summary["steps"] == 2
    config = next(r["run"]["config"]["update"] for r in records if r.get("type") == "run")
    assert config["algo"]["clip_eps"] == cfg.algo.clip_eps and config["model"]["name"] == cfg.model.name

    assert_equal_scalars(mlflow_scalars(run, "t1"), want, "mlflow")
    _, found = mlflow_run(run, "t1")
    assert found.data.params["algo.clip_eps"] == str(cfg.algo.clip_eps) and found.data.tags["summary.val_f1_end"] == "0.5"
    assert found.info.status == "FINISHED"


def test_a_tracker_that_cannot_start_stops_the_run_in_one_line(tmp_path):
    cfg = load_config(None, ["metrics.loggers=[jsonl,tensorboard,mlflow]", "metrics.mlflow_tracking_uri=nosuchscheme://x"])
    with pytest.raises(TrackerError, match=r"^metrics.loggers: mlflow failed to start: \w+") as err:
        Trackers(cfg, tmp_path, "t")
    assert "\n" not in str(err.value)


def test_a_tracker_failing_mid_run_is_counted_and_the_others_go_on(tmp_path, capsys):
    """The MLflow run is deleted under the tracker (a real failure of its client): each later row
    fails there, is counted, and still reaches metrics.jsonl and TensorBoard."""
    run = tmp_path / "runs" / "t2"
    run.mkdir(parents=True)
    cfg = load_config(None, ["metrics.loggers=[jsonl,tensorboard,mlflow]"])
    trackers = Trackers(cfg, run, "t2")
    log = MetricsLog(run / "metrics.jsonl", prometheus=False, trackers=trackers)
    log.write(rows()[1], "t2")
    client, found = mlflow_run(run, "t2")
    client.delete_run(found.info.run_id)
    log.write(rows()[2], "t2")
    log.write(rows()[3], "t2")
    assert trackers.errors == {"mlflow": 2}
    assert capsys.readouterr().err.count("warning: mlflow failed") == 1  # warned once, counted each time
    log.finish({"run": "t2"})
    assert_equal_scalars(tensorboard_scalars(run), expected(run), "tensorboard", rel=1e-6)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2]


@pytest.mark.slow
def test_a_training_run_logs_each_step_and_validation_to_every_tracker(tmp_path, warm_tiny):
    """`memr2 train train.max_steps=2 metrics.loggers=[jsonl,tensorboard,wandb,mlflow]` on the tiny world."""
    from tests.tiny_world import WORLD, finish, memr2

    finish(memr2("train", *WORLD, f"model.name={warm_tiny}", "rollout.temperature=1.0", "rollout.n_global=4", "rollout.m_local=2",
                 "rollout.max_new_tokens=192", "train.conversations_per_step=1", "curriculum.stages=[{horizon: 2, epochs: 2}]",
                 "train.max_steps=2", "learner.mini_batch=8", "learner.micro_batch=4", "metrics.prometheus=false",
                 "train.warmstart.enabled=false", ALL, f"metrics.run_dir={tmp_path}", "metrics.run_name=tracked"))
    run = tmp_path / "tracked"
    want = expected(run)
    assert {"reward_mean", "step_time_s", "val_f1"} <= set(want) and sorted(want["val_f1"]) == [0, 1, 2]
    assert_equal_scalars(tensorboard_scalars(run), want, "tensorboard", rel=1e-6)
    records = wandb_records(run)
    assert_equal_scalars(wandb_scalars(records), want, "wandb")
    summary = json.loads((run / "summary.json").read_text())
    logged = {k: v for r in records if r.get("type") == "summary" for k, v in r["summary"]["update"].items()}
    assert logged["val_f1_end"] == summary["val_f1_end"] and logged["steps"] == 2
    assert_equal_scalars(mlflow_scalars(run, "tracked"), want, "mlflow")
