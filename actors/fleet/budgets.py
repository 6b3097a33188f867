"""A rollout worker's start, timed on two budgets that each mean one thing:

    requested --cluster.placement_timeout_s--> placed --cluster.worker_start_timeout_s--> live
              a node with the worker's resources        its engine: download, load, CUDA graphs
              (an autoscaler may add one meanwhile)

A 7B engine that is still loading is placed, not unplaceable; a worker the cluster has no room for
never starts its engine. Pure: the fleet passes its slots (requested_at, placed_at, ready) and now.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from common.config import ClusterConfig


class Starting(Protocol):
    requested_at: float
    placed_at: float | None  # None until the worker's process runs on a node
    ready: object | None  # its engine's start while starting; None once live


@dataclass(frozen=True)
class StartBudget:
    placement_s: float | None  # None: no limit
    start_s: float | None

    @classmethod
    def from_config(cls, c: ClusterConfig) -> StartBudget:
        return cls(c.placement_timeout_s, c.worker_start_timeout_s)

    def unplaced_too_long(self, slot: Starting, now: float) -> bool:
        return slot.placed_at is None and self.placement_s is not None and now - slot.requested_at > self.placement_s

    def starting_too_long(self, slot: Starting, now: float) -> bool:
        """Placed, engine not ready, and past the start budget: a failed start."""
        return (slot.placed_at is not None and slot.ready is not None and self.start_s is not None
                and now - slot.placed_at > self.start_s)

    def none_placeable(self, slots: Iterable[Starting], now: float) -> bool:
        """No worker live or placed, and one has waited past the placement budget: the cluster
        cannot place a worker (a placed one that is still starting is the start budget's)."""
        slots = list(slots)
        return all(s.placed_at is None for s in slots) and any(self.unplaced_too_long(s, now) for s in slots)

    def unplaceable(self, need: str, have: dict[str, float]) -> str:
        """The one line for a worker no node could take within the placement budget."""
        return (f"no rollout worker ({need}) could be placed within {self.placement_s:g} s (cluster.placement_timeout_s; "
                f"the cluster has {have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU): add nodes or lower rollout.*_per_actor")

    def awaited(self, slots: Iterable[Starting], now: float) -> list[Starting]:
        """Workers not live yet that are worth waiting for at start-up: placed ones (their start is
        bounded) and unplaced ones within the placement budget. The rest stay pending as demand
        for the autoscaler while the job goes on."""
        return [s for s in slots if s.ready is not None and not self.unplaced_too_long(s, now)]
