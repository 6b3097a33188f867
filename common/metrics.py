"""Per-step metrics: one JSON line each in the run's metrics.jsonl, Prometheus gauges, and the
experiment trackers metrics.loggers names (common.trackers).

Gauges go through `ray.util.metrics`, so they appear on every node's Ray metrics export port as
`ray_memr2_<name>` and Prometheus scrapes them with the rest of the cluster (deploy/prometheus.yml).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from common.config import Config
from common.trackers import Trackers

# The series the Grafana dashboard plots; every other key only goes to metrics.jsonl.
GAUGES = (
    "reward_mean", "val_f1", "format_failures", "degenerate_groups", "tokens_per_s", "step_time_s",
    "rollout_s", "update_s", "sync_s", "loss", "kl", "entropy", "clip_frac", "m_fail_mean", "policy_version",
    "answer_retries", "answer_failures", "learner_restarts", "ahead_wait_s", "sleep_s", "wake_s",
    "logp_mismatch", "logp_mismatch_kl", "staleness_mean", "stale_groups", "prefix_token_ratio",
    "trunk_token_ratio", "credit_corr_global", "credit_corr_local",
)


class MetricsLog:
    def __init__(self, path: Path, prometheus: bool, trackers: Trackers | None = None) -> None:
        self.path, self.trackers = path, trackers
        self._gauges: dict[str, Any] = {}
        if prometheus:
            from ray.util.metrics import Gauge

            self._gauges = {k: Gauge(f"memr2_{k}", description=f"memr2 training: {k}", tag_keys=("run",)) for k in GAUGES}

    def write(self, row: dict[str, Any], run: str) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, gauge in self._gauges.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags={"run": run})
        if self.trackers is not None:
            self.trackers.log(row, row.get("step", 0))

    def finish(self, summary: dict[str, Any]) -> None:
        """The run's summary to the trackers, which then close."""
        if self.trackers is not None:
            self.trackers.finish(summary)

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows of steps the checkpoint does not cover (a kill mid-step)."""
        kept = [r for r in self.rows() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def run_root(cfg: Config) -> Path:
    """metrics.run_dir; unset, ./runs, or ~/memr2-runs for a `ray job submit` entrypoint, whose
    working directory is a temporary copy that Ray deletes."""
    if cfg.metrics.run_dir:
        return Path(cfg.metrics.run_dir).expanduser()
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray's job supervisor for the entrypoint
        return Path.home() / "memr2-runs"
    return Path("runs")
