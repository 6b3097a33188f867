"""`memr2 bench async`: the embedded default's training with rollouts and updates alternating
(train.max_staleness=0) and overlapped (1), side by side in one run.

One rollout worker and the learner rank are each held to one core (rollout.cpus_per_actor=1,
learner.cpus_per_rank=1: one torch thread each), so on two cores the overlap is real and neither
arm gets more compute than the other. Both runs start from one warm start (made once) and run
the same steps; steps per hour count the training steps' own time (step_time_s: rollouts the
step waited for, update, sync), not the validations both runs share. Reported: the speedup, the
async run's mean staleness (updates between the policy that generated a row and the update that
trains on it, averaged over rows, then over the steps that updated), and each run's final validation F1 with the sync
run's 95% interval, the noise the async F1 is to be read against.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from actors.fleet.cluster import init_ray
from common.config import load_config
from common.metrics import run_root
from learner.bench_learning import _shared_warmstart
from learner.train import job_asks, run

ONE_CORE_EACH = ["rollout.num_actors=1", "rollout.cpus_per_actor=1", "learner.cpus_per_rank=1", "cluster.num_cpus=2",
                 "metrics.prometheus=false"]


def run_async_bench(overrides: list[str] | None = None) -> dict:
    start = time.perf_counter()
    overrides = [*ONE_CORE_EACH, *(overrides or [])]
    base = load_config(None, overrides)
    root = run_root(base) / time.strftime("bench-async-%Y%m%d-%H%M%S")
    init_ray(base.cluster, job_asks(base))
    warm = _shared_warmstart(base, root / "warmstart")
    arms = {}
    for name, staleness in (("sync", 0), ("async", 1)):
        cfg = load_config(None, [*overrides, f"train.max_staleness={staleness}", f"metrics.run_dir={root}", f"metrics.run_name={name}"])
        if warm is not None:
            shutil.copytree(warm, root / name / "warmstart")
        summary = run(cfg)
        arms[name] = _measure(summary, root / name)
    sync, overlapped = arms["sync"], arms["async"]
    return {
        "sync_steps_per_h": sync["steps_per_h"],
        "async_steps_per_h": overlapped["steps_per_h"],
        "speedup": overlapped["steps_per_h"] / sync["steps_per_h"],
        "mean_staleness": overlapped["staleness"],
        "sync_staleness": sync["staleness"],
        "val_f1_sync": sync["val_f1_end"],
        "val_f1_sync_ci": sync["val_f1_end_ci"],
        "val_f1_async": overlapped["val_f1_end"],
        "val_f1_async_ci": overlapped["val_f1_end_ci"],
        "val_f1_start": sync["val_f1_start"],
        "runs": arms,
        "wall_s": time.perf_counter() - start,
        "out": str(root),
    }


def _measure(summary: dict, run_dir: Path) -> dict:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in rows if "step_time_s" in r]
    split = {k: statistics.fmean(r.get(k, 0.0) for r in steps) for k in ("rollout_s", "rollout_wait_s", "update_s", "ahead_wait_s", "sync_s")}
    return {
        "steps": len(steps),
        "steps_per_h": 3600 * len(steps) / sum(r["step_time_s"] for r in steps),
        "staleness": statistics.fmean([r["staleness_mean"] for r in steps if "staleness_mean" in r] or [0.0]),  # steps that updated
        "val_f1_start": summary["val_f1_start"],
        "val_f1_end": summary["val_f1_end"],
        "val_f1_end_ci": summary.get("val_f1_end_ci"),
        "step_split_mean_s": split,
        "wall_s": summary["wall_s"],
    }
