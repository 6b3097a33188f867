"""The fleet's Prometheus series, through `ray.util.metrics` (each node's metrics export port).

Ray exports a metric `x` as `ray_x`, and a Counter as `ray_x_total`; `exported_series` gives those
names, which deploy/grafana_dashboard.json queries and its promtool test feeds.

    driver (one series per run)          worker (one series per run and worker)
    fleet_live_workers      gauge        worker_generated_tokens   counter (Grafana takes rate())
    fleet_target_workers    gauge        worker_policy_version     gauge
    fleet_pending_tasks     gauge
    fleet_running_tasks     gauge
    fleet_worker_failures   counter
    fleet_tasks_retried     counter
    fleet_duplicate_results counter
"""

from __future__ import annotations

PREFIX = "memr2_"
FLEET_GAUGES = ("fleet_live_workers", "fleet_target_workers", "fleet_pending_tasks", "fleet_running_tasks")
FLEET_COUNTERS = ("fleet_worker_failures", "fleet_tasks_retried", "fleet_duplicate_results")
WORKER_GAUGES = ("worker_policy_version",)
WORKER_COUNTERS = ("worker_generated_tokens",)


def exported_series() -> dict[str, str]:
    """Prometheus name -> kind, as Ray exports every fleet series."""
    out = {f"ray_{PREFIX}{n}": "gauge" for n in FLEET_GAUGES + WORKER_GAUGES}
    out |= {f"ray_{PREFIX}{n}_total": "counter" for n in FLEET_COUNTERS + WORKER_COUNTERS}
    return out


class _Series:
    def __init__(self, gauges: tuple[str, ...], counters: tuple[str, ...], tags: dict[str, str], enabled: bool) -> None:
        self.tags = tags
        self._metrics: dict = {}
        if enabled:
            from ray.util.metrics import Counter, Gauge

            keys = tuple(tags)
            self._metrics = {n: Gauge(PREFIX + n, description=f"memr2 fleet: {n}", tag_keys=keys) for n in gauges}
            self._metrics |= {n: Counter(PREFIX + n, description=f"memr2 fleet: {n}", tag_keys=keys) for n in counters}

    def set(self, name: str, value: float) -> None:
        if name in self._metrics:
            self._metrics[name].set(float(value), tags=self.tags)

    def inc(self, name: str, value: float = 1.0) -> None:
        if name in self._metrics and value > 0:
            self._metrics[name].inc(float(value), tags=self.tags)


def fleet_series(run: str, enabled: bool) -> _Series:
    return _Series(FLEET_GAUGES, FLEET_COUNTERS, {"run": run}, enabled)


def worker_series(run: str, worker_id: str, enabled: bool) -> _Series:
    return _Series(WORKER_GAUGES, WORKER_COUNTERS, {"run": run, "worker": worker_id}, enabled)
