"""The rollout fleet: workers that join, leave and die mid-run without losing or duplicating a group.

The driver deals a step's tasks (actors.fleet.tasks) to whichever workers are live, each up to
its lane capacity (`rollout.tasks_per_worker` global tasks' worth of lanes: 4 global tasks, or 32
one-lane validation tasks); a local task is dealt once its anchor's snapshot is in the keeper.
Every result enters the step's ledger exactly once, keyed by task id.

    a worker dies (actor killed, kill -9, node removed)  its tasks' refs raise: it is dropped,
                                                          its tasks are queued again at the front
    a worker hangs (no result for cluster.task_timeout_s) the same, and it is killed
    a worker fails to start (or is not live               dropped and replaced; cluster.max_task_attempts
      cluster.worker_start_timeout_s after placement)     failed starts in a row stop the job
    a dropped worker's late result                        accepted if first, else counted and dropped
    fewer workers than the target                         new ones start; they pull the current
                                                          policy before their first task
    backlog above / below the fleet's size                actors.fleet.scaling: grow at once,
                                                          shrink after a delay by draining
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

import ray
from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError, RayTaskError, WorkerCrashedError

from actors.agent.endpoint import EndpointDown
from actors.agent.groups import EvalResult
from actors.fleet.batch import RolloutBatch
from actors.fleet.budgets import StartBudget
from actors.fleet.colocation import Colocation
from actors.fleet.errors import RolloutError, WorkerStartError, one_line
from actors.fleet.metrics import fleet_series
from actors.fleet.policy_store import PolicyStore, on_this_node
from actors.fleet.scaling import CapacityRequest, ScalingPolicy
from actors.fleet.slots import Faults, Round, Slot, Work, lane_capacity, max_tasks, pick_slot, worker_resources
from actors.fleet.tasks import LocalTask, StepPlan, Task, plan_validation
from actors.fleet.worker import RolloutWorker
from common.config import Config
from common.types import Conversation
from memory_service.snapshots import SnapshotKeeper

log = logging.getLogger("memr2.fleet")
POLL_S = 0.5  # how often the driver looks at deadlines and the backlog when nothing arrives
WORKER_LOST = (RayActorError, WorkerCrashedError, ObjectLostError, OwnerDiedError)


class RolloutFleet:
    def __init__(self, cfg: Config, run: str = "rollout", other_bundles: Iterable[dict[str, float]] = (),
                 colocation: Colocation | None = None) -> None:
        self.cfg, self.run_name = cfg, run
        self.colocation = colocation  # cluster.colocate: worker i on bundle i, a replacement too
        # Started by the driver on its own node: they must outlive any worker and any worker node.
        here = on_this_node()
        self.keeper = SnapshotKeeper.options(scheduling_strategy=here).remote()
        self.policy_store = PolicyStore.options(scheduling_strategy=here).remote()
        self.policy = ScalingPolicy.from_config(cfg)
        self.budget = StartBudget.from_config(cfg.cluster)
        self.capacity = CapacityRequest(worker_resources(cfg), list(other_bundles))
        self.series = fleet_series(run, cfg.metrics.prometheus)
        self._worker_cls = ray.remote(RolloutWorker)
        self.slots: dict[str, Slot] = {}
        self.target = 0
        self.faults, self.totals = Faults(), Faults()
        self._orphans: dict[ray.ObjectRef, tuple[Work, str]] = {}  # dropped workers' tasks, still watched
        self._ids = itertools.count()
        self._start_failures = 0
        self._eval_rounds = itertools.count()
        self.ran_on: dict[str, str] = {}  # task id -> the worker whose result was accepted (last run)
        self._await_live(self.policy.target(0))

    def _worker_options(self) -> dict:
        r, c = self.cfg.rollout, self.cfg.cluster
        return {
            "num_cpus": r.cpus_per_actor, "num_gpus": r.gpus_per_actor, "resources": dict(r.resources),
            "max_restarts": 0, "max_task_retries": 0,  # the fleet replaces and retries, keyed by task
            # A thread per task it holds, and a few for calls beside them (weights, status).
            "max_concurrency": max_tasks(self.cfg) + 4,
            "scheduling_strategy": "SPREAD" if c.worker_placement == "spread" else "DEFAULT",
        }

    def _placement(self) -> tuple[int | None, dict]:
        """The bundle a new worker takes (colocated: the one no live worker holds) and its options."""
        if self.colocation is None:
            return None, self._worker_options()
        bundle = min(set(range(self.colocation.pairs)) - {s.bundle for s in self.slots.values()})
        return bundle, self._worker_options() | {"num_gpus": self.colocation.worker.get("GPU", 0.0),
                                                 "scheduling_strategy": self.colocation.on(bundle)}

    # ------------------------------------------------------------------ what the driver calls

    def run(self, plan: StepPlan) -> RolloutBatch:
        """A step's global and local tasks; the batch in plan order; its snapshots released."""
        start = time.perf_counter()
        results = self.run_tasks(plan.tasks)
        ray.get(self.keeper.release.remote(plan.prefix))
        batch = RolloutBatch.assemble(plan, results)
        batch.wall_s = time.perf_counter() - start
        return batch

    def evaluate(self, conversations: Sequence[Conversation], horizon: int,
                 on_result: Callable[[str], None] | None = None) -> list[EvalResult]:
        """One rollout per conversation at the evaluation temperature, all in one batch."""
        tasks = plan_validation(conversations, horizon, next(self._eval_rounds))
        results = self.run_tasks(tasks, on_result)
        return [results[t.task_id] for t in tasks]

    def load_weights(self, wrapped_weights: list, version: int) -> None:
        """Every live worker takes the new weights; one that died meanwhile is dropped and replaced
        (its replacement pulls them from the policy store, which the caller published first)."""
        calls = {s.handle.load_weights.remote(wrapped_weights, version): s for s in self.live()}
        for ref, slot in calls.items():
            try:
                ray.get(ref)
            except WORKER_LOST as err:
                self._drop(slot, Round(), f"died during a weight sync ({type(err).__name__})")

    def sleep(self) -> float:
        """Colocated: every engine gives its GPU to the update (rollout.sleep_level); seconds."""
        return self.colocation.call(self.live(), "sleep", self.cfg.rollout.sleep_level) if self.colocation else 0.0

    def wake(self, tags: list[str]) -> float:
        """Colocated: the engines take back their "weights" (before a sync) or "kv_cache"."""
        return self.colocation.call(self.live(), "wake_up", tags) if self.colocation else 0.0

    def drop_workers(self, slots: Iterable[Slot], reason: str) -> None:
        """Drop (kill) these workers; the fleet starts replacements, which pull the current policy
        from the policy store. For a collective weight sync that lost one of its members."""
        for slot in slots:
            if slot.worker_id in self.slots:
                self._drop(slot, Round(), reason)

    def run_tasks(self, tasks: Sequence[Task], on_result: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Run every task once on the live workers; task id -> result."""
        rnd = Round(expected=len(tasks), on_result=on_result)
        for task in tasks:
            if isinstance(task, LocalTask):
                rnd.gated[self.keeper.wait.remote(task.snapshot_id)] = task
            else:
                rnd.queue.append(Work(task, None))
        while not rnd.done():
            self._tick(rnd)
        self._orphans.clear()
        self._publish_gauges(0, 0)
        self.ran_on = rnd.ran_on
        return rnd.results

    def idle(self, seconds: float) -> None:
        """Keep the fleet's size current for `seconds` while the driver has no tasks for it."""
        rnd, end = Round(), time.monotonic() + seconds
        while time.monotonic() < end:
            self._tick(rnd)

    def await_target(self) -> None:
        """Wait until the fleet is at its target size (replacements and new workers are live)."""
        self._await_live(self.target)

    def live(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.ready is None]

    def in_flight(self) -> list[tuple[Slot, Task]]:
        """(worker, task) for every task dealt and not finished (safe to call from another thread)."""
        return [(s, w.task) for s in list(self.slots.values()) for w in list(s.running.values())]

    def take_faults(self) -> dict[str, int]:
        """Failures, retries and duplicates since the last call (a metrics row's share)."""
        out, self.faults = asdict(self.faults), Faults()
        return out

    def status(self) -> dict[str, int]:
        return {"live_workers": len(self.live()), "target_workers": self.target, **asdict(self.totals)}

    def shutdown(self) -> None:
        for slot in list(self.slots.values()):
            self._kill(slot)
        self.slots.clear()
        self.capacity.update(0)
        for actor in (self.keeper, self.policy_store):
            ray.kill(actor)

    # ------------------------------------------------------------------ the loop

    def _tick(self, rnd: Round) -> None:
        waiting = [w.task for w in rnd.queue] + list(rnd.gated.values())
        self._rescale(sum(t.lanes for t in waiting) + sum(s.lanes for s in self.slots.values()))
        self._dispatch(rnd.queue)
        self._publish_gauges(len(rnd.queue) + len(rnd.gated), sum(len(s.running) for s in self.slots.values()))
        watched = [*rnd.gated, *self._orphans, *(r for s in self.slots.values() for r in s.running),
                   *(s.ready if s.placed is None else s.placed for s in self.slots.values() if s.ready is not None)]
        ready, _ = ray.wait(watched, num_returns=1, timeout=POLL_S) if watched else ([], [])
        for ref in ready:
            if ref in rnd.gated:
                task = rnd.gated.pop(ref)
                rnd.queue.append(Work(task, ray.get(ref)[0]))
            else:
                self._settle(ref, rnd)
        self._drop_hung(rnd)
        self._check_starts(rnd)

    def _dispatch(self, queue: deque[Work]) -> None:
        """In queue order, each task to the least-loaded live worker with lanes to spare for it."""
        now, capacity, most = time.monotonic(), lane_capacity(self.cfg), max_tasks(self.cfg)
        while queue:
            slot = pick_slot(self.live(), queue[0].task, capacity, most)
            if slot is None:
                return
            work = queue.popleft()
            if not slot.running:
                slot.progress_at = now
            slot.running[slot.handle.run.remote(work.task, work.snapshot)] = work

    def _settle(self, ref: ray.ObjectRef, rnd: Round) -> None:
        if ref in self._orphans:  # a dropped worker's result: first one in still counts
            work, worker_id = self._orphans.pop(ref)
            try:
                value = ray.get(ref)
            except Exception:  # noqa: BLE001 - the dead worker's error; its task was queued again
                return
            self._accept(rnd, work.task.task_id, value, worker_id)
            return
        slot = next(s for s in self.slots.values() if ref in (s.placed, s.ready) or ref in s.running)
        if ref in (slot.placed, slot.ready):
            self._starting(slot, ref, rnd)
            return
        work = slot.running.pop(ref)
        try:
            value = ray.get(ref)
        except WORKER_LOST as err:
            slot.running[ref] = work  # queued again with the rest of its tasks
            self._drop(slot, rnd, f"died ({type(err).__name__})")
            return
        except RayTaskError as err:
            if isinstance(err.cause, EndpointDown):  # the endpoint, not the worker: one line, no retry elsewhere
                raise EndpointDown(str(err.cause)) from None
            raise RolloutError(f"task {work.task.task_id} failed on rollout worker {slot.worker_id}: {one_line(err)}") from None
        slot.progress_at = time.monotonic()
        self._accept(rnd, work.task.task_id, value, slot.worker_id)
        if slot.draining and not slot.running:
            self._retire(slot)

    def _accept(self, rnd: Round, task_id: str, value: Any, worker_id: str) -> None:
        if not rnd.accept(task_id, value, worker_id):
            self._count("duplicate_results")

    def _starting(self, slot: Slot, ref: ray.ObjectRef, rnd: Round) -> None:
        """node() returned: placed, the start budget begins. start() returned: live."""
        try:
            value = ray.get(ref)
        except (*WORKER_LOST, RayTaskError) as err:
            self._start_failed(slot, rnd, one_line(err))
            return
        if ref == slot.placed:
            slot.placed, slot.placed_at = None, time.monotonic()
        else:
            slot.info, slot.ready, slot.progress_at, self._start_failures = value, None, time.monotonic(), 0

    def _start_failed(self, slot: Slot, rnd: Round, why: str) -> None:
        """Dropped and replaced like a worker that died; so many in a row mean none can start."""
        self._start_failures += 1
        self._drop(slot, rnd, f"failed to start: {why}")
        if self._start_failures >= self.cfg.cluster.max_task_attempts:
            raise WorkerStartError(f"rollout workers fail to start ({self._start_failures} in a row): {why}")

    def _drop(self, slot: Slot, rnd: Round, reason: str) -> None:
        """A worker is lost: count it, queue its tasks again (first in line), kill what is left of it."""
        self.slots.pop(slot.worker_id, None)
        self._count("worker_failures")
        works = list(slot.running.values())
        self._orphans.update({ref: (work, slot.worker_id) for ref, work in slot.running.items()})
        for work in reversed(works):
            rnd.attempts[work.task.task_id] += 1
            if rnd.attempts[work.task.task_id] >= self.cfg.cluster.max_task_attempts:
                raise RolloutError(f"task {work.task.task_id} lost {rnd.attempts[work.task.task_id]} rollout workers; the last {reason}")
            rnd.queue.appendleft(work)
            self._count("tasks_retried")
        log.warning("memr2: rollout worker %s %s; %d task(s) queued again", slot.worker_id, reason, len(works))
        self._kill(slot)

    def _drop_hung(self, rnd: Round) -> None:
        timeout = self.cfg.cluster.task_timeout_s
        if timeout is None:
            return
        now = time.monotonic()
        for slot in [s for s in self.live() if s.running and now - s.progress_at > timeout]:
            self._drop(slot, rnd, f"returned nothing for {timeout:g} s (cluster.task_timeout_s)")

    # ------------------------------------------------------------------ size

    def _rescale(self, backlog: int) -> None:
        self.target = self.policy.target(backlog)
        self.capacity.update(self.target if len(self.live()) < self.target else 0)
        active = [s for s in self.slots.values() if not s.draining]
        for _ in range(self.target - len(active)):
            self._start_worker()
        # Retire the surplus: workers not placed, then starting, then idle, then busy ones by draining.
        surplus = sorted(active, key=lambda s: (s.ready is None, s.placed is None, len(s.running)))[: max(0, len(active) - self.target)]
        for slot in surplus:
            if slot.running:
                slot.draining = True  # finishes its tasks first, gets no new ones
            else:
                self._retire(slot)

    def _start_worker(self) -> None:
        wid = f"w{next(self._ids)}"
        bundle, options = self._placement()
        handle = self._worker_cls.options(**options).remote(self.cfg, wid, self.run_name, self.keeper, self.policy_store)
        # node() returns once the actor's process runs (placed); start() then builds the engine.
        self.slots[wid] = Slot(wid, handle, time.monotonic(), handle.node.remote(), handle.start.remote(), bundle=bundle)

    def _retire(self, slot: Slot) -> None:
        self.slots.pop(slot.worker_id, None)
        self._kill(slot)

    def _await_live(self, n: int) -> None:
        """Start-up: wait for n workers, or go on with those live once the rest are unplaced past
        cluster.placement_timeout_s (they stay pending: demand for the autoscaler)."""
        rnd = Round()
        while len(self.live()) < n:
            self._tick(rnd)  # first: it starts the workers still missing (a replacement), so they count
            if self.live() and not self.budget.awaited(self.slots.values(), time.monotonic()):
                break

    def _check_starts(self, rnd: Round) -> None:
        """The start budgets: an engine not ready in time is a failed start; no worker live or
        placed within cluster.placement_timeout_s stops the job with one line."""
        now = time.monotonic()
        for slot in [s for s in self.slots.values() if self.budget.starting_too_long(s, now)]:
            self._start_failed(slot, rnd, f"engine not ready {self.budget.start_s:g} s after placement (cluster.worker_start_timeout_s)")
        if not self.budget.none_placeable(self.slots.values(), now):
            return
        need = ", ".join(f"{v:g} {k}" for k, v in worker_resources(self.cfg).items() if v > 0)
        raise ValueError(self.budget.unplaceable(need, ray.cluster_resources()))

    # ------------------------------------------------------------------ bookkeeping

    def _count(self, name: str) -> None:
        for faults in (self.faults, self.totals):
            setattr(faults, name, getattr(faults, name) + 1)
        self.series.inc(f"fleet_{name}")

    def _publish_gauges(self, pending: int, running: int) -> None:
        self.series.set("fleet_live_workers", len(self.live()))
        self.series.set("fleet_target_workers", self.target)
        self.series.set("fleet_pending_tasks", pending)
        self.series.set("fleet_running_tasks", running)

    @staticmethod
    def _kill(slot: Slot) -> None:
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
