"""What the fleet's driver keeps per worker and per round: a worker's slot and the work it runs, the
round's ledger (every task id accepted once), and the fault counts the step reports."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import ray

from actors.fleet.tasks import LocalTask, Task
from common.config import Config


def worker_resources(cfg: Config) -> dict[str, float]:
    r = cfg.rollout
    return {"CPU": r.cpus_per_actor, "GPU": r.gpus_per_actor, **r.resources}


def lane_capacity(cfg: Config) -> int:
    """The lanes a worker keeps in flight: rollout.tasks_per_worker global tasks' worth, so a
    validation round's one-lane tasks fill an engine as a step's global tasks do."""
    return cfg.rollout.tasks_per_worker * cfg.rollout.n_global


def max_tasks(cfg: Config) -> int:
    """The most tasks a worker can hold at once (one per actor thread): one-lane tasks filling it,
    or one in deterministic mode, where a second task would join the batch at a step set by timing."""
    return 1 if cfg.rollout.deterministic else lane_capacity(cfg)


class Work(NamedTuple):
    task: Task
    snapshot: ray.ObjectRef | None  # a local task's anchor snapshot, resolved by Ray on the worker


@dataclass(eq=False)
class Slot:
    worker_id: str
    handle: ray.actor.ActorHandle
    requested_at: float  # the placement budget's clock
    placed: ray.ObjectRef | None  # its node() until the actor runs on a node; then None
    ready: ray.ObjectRef | None  # its start() (the engine) until it is live; then None
    placed_at: float | None = None  # the start budget's clock
    info: dict | None = None
    running: dict[ray.ObjectRef, Work] = field(default_factory=dict)
    progress_at: float = 0.0  # a dispatch onto it while idle, or its last result: the hang clock
    draining: bool = False
    bundle: int | None = None  # colocated: the placement-group bundle it shares with learner rank `bundle`

    @property
    def lanes(self) -> int:
        return sum(w.task.lanes for w in self.running.values())


def pick_slot(slots: list[Slot], task: Task, capacity: int, most: int) -> Slot | None:
    """The least-loaded worker (in lanes) with lanes to spare for `task` and fewer than `most` tasks;
    an idle worker takes any task, however many lanes. None: the task waits."""
    free = [s for s in slots if not s.draining and len(s.running) < most and (not s.running or s.lanes + task.lanes <= capacity)]
    return min(free, key=lambda s: s.lanes, default=None)


@dataclass
class Faults:
    worker_failures: int = 0
    tasks_retried: int = 0
    duplicate_results: int = 0


@dataclass
class Round:
    """One batch of tasks in flight: the queue, the local tasks waiting for their snapshot, results."""

    queue: deque[Work] = field(default_factory=deque)
    gated: dict[ray.ObjectRef, LocalTask] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    expected: int = 0
    attempts: Counter = field(default_factory=Counter)
    ran_on: dict[str, str] = field(default_factory=dict)
    on_result: Callable[[str], None] | None = None  # task id, once per task (a progress bar)

    def accept(self, task_id: str, value: Any, worker_id: str = "") -> bool:
        if task_id in self.results:
            return False
        self.results[task_id], self.ran_on[task_id] = value, worker_id
        if self.on_result is not None:
            self.on_result(task_id)
        return True

    def done(self) -> bool:
        return len(self.results) == self.expected
