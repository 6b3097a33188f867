"""How many rollout workers the fleet wants, and telling the Ray autoscaler before the work arrives.

The policy is Kubernetes HPA's, on the fleet's backlog in lanes: the desired size is
`ceil(lanes of unfinished tasks / a worker's lane capacity)` (actors.fleet.slots.lane_capacity:
`rollout.tasks_per_worker` global tasks' worth) clamped to [min, max]; the fleet grows to it at
once and shrinks only to the largest desired size of the last `cluster.scale_down_delay_s`. So a
step's burst of tasks brings workers immediately, the short lull of an update (no tasks) does not
tear them down, and a run whose steps need fewer workers shrinks once that has held for the delay.
min = max is a fixed-size fleet.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from actors.fleet.slots import lane_capacity
from common.config import Config


class ScalingPolicy:
    def __init__(self, lo: int, hi: int, initial: int, lanes_per_worker: int, delay_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lo, self.hi, self.per_worker, self.delay_s, self.clock = lo, hi, lanes_per_worker, delay_s, clock
        self._wants: deque[tuple[float, int]] = deque([(clock(), initial)])

    @classmethod
    def from_config(cls, cfg: Config, clock: Callable[[], float] = time.monotonic) -> ScalingPolicy:
        lo, hi = autoscale_bounds(cfg)
        return cls(lo, hi, cfg.rollout.num_actors, lane_capacity(cfg), cfg.cluster.scale_down_delay_s, clock)

    def target(self, backlog: int) -> int:
        """The fleet's size now, for `backlog` lanes of tasks not yet finished (pending, gated or running)."""
        now = self.clock()
        want = min(self.hi, max(self.lo, math.ceil(backlog / self.per_worker)))
        self._wants.append((now, want))
        while len(self._wants) > 1 and self._wants[0][0] < now - self.delay_s:
            self._wants.popleft()
        return max(w for _, w in self._wants)


def autoscale_bounds(cfg: Config) -> tuple[int, int]:
    """[min, max] workers; either bound unset is rollout.num_actors (a fixed-size fleet)."""
    c, n = cfg.cluster, cfg.rollout.num_actors
    return (n if c.autoscale_min_actors is None else c.autoscale_min_actors,
            n if c.autoscale_max_actors is None else c.autoscale_max_actors)


class CapacityRequest:
    """`ray.autoscaler.sdk.request_resources` for `size` workers plus the job's other actors while
    the fleet grows, so the autoscaler (or KubeRay's) starts nodes before the workers are even
    placed (pending workers count as demand too). Cleared (size 0) once the fleet has its workers:
    a standing request would hold nodes the fleet has drained, since autoscaler v2 may count any
    idle node as the one that satisfies it. Each call replaces the last."""

    def __init__(self, worker_bundle: dict[str, float], other_bundles: list[dict[str, float]]) -> None:
        self.worker_bundle = {k: v for k, v in worker_bundle.items() if v > 0}
        self.other = [{k: v for k, v in b.items() if v > 0} for b in other_bundles]
        self.size: int | None = None

    def update(self, size: int) -> None:
        if size == self.size:
            return
        from ray.autoscaler.sdk import request_resources

        bundles = [dict(self.worker_bundle) for _ in range(size)] + [dict(b) for b in self.other] if size else []
        request_resources(bundles=bundles)
        self.size = size

