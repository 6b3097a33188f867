"""The rollout worker: a Ray actor owning one engine and one answer agent, running any task.

It holds as many tasks as its lane capacity allows (actors.fleet.slots.lane_capacity), each on its
own actor thread; their lanes share one continuous batch on the engine (actors.engines.scheduler).

A worker holds no state a step depends on: the snapshots its global tasks take for local tasks go
to the step's snapshot keeper as soon as they exist, and its results go back to the driver with
the task. So the fleet may drop it at any moment and re-run its tasks elsewhere. It pulls the
latest policy from the policy store when it starts and before every task, so a replacement or an
autoscaled worker never generates with a stale policy unawares.

Its start is two calls, so that the fleet can time them apart (actors.fleet.budgets): `node()`
returns as soon as the actor's process runs on a node (placed), `start()` builds the engine
(download, load, CUDA graphs: minutes on a 7B model) and returns `info()`.
"""

from __future__ import annotations

import os
import socket
import time

import ray
import torch

from actors.agent.answer_agent import make_answer_agent
from actors.agent.episode import EpisodeRunner, Lane
from actors.agent.groups import EvalResult, GlobalResult, GroupCollector, LocalResult
from actors.agent.prompts import context_tokens
from actors.engines.base import Generation, Request, SamplingSpec
from actors.engines.factory import make_engine
from actors.engines.models import resolve_model
from actors.engines.scheduler import BatchStats, Scheduler
from actors.fleet.metrics import worker_series
from actors.fleet.tasks import EvalTask, GlobalTask, LocalTask, Task
from common.config import Config
from common.types import Session
from memory_service.bank import MemoryBank


class RolloutWorker:
    def __init__(self, cfg: Config, worker_id: str, run: str, keeper: ray.actor.ActorHandle, policy_store: ray.actor.ActorHandle) -> None:
        # Ray sets OMP_NUM_THREADS=1 in actors; give torch the CPUs this actor reserved.
        torch.set_num_threads(max(1, int(cfg.rollout.cpus_per_actor)))
        self.cfg, self.worker_id, self.run_name = cfg, worker_id, run
        self.keeper, self.policy_store = keeper, policy_store

    def node(self) -> str:
        """Returns at once: the actor is placed (its engine has not started yet)."""
        return ray.get_runtime_context().get_node_id()

    def start(self) -> dict:
        """Build the engine and everything that generates through it; pull the current policy."""
        cfg = self.cfg
        self.engine = make_engine(
            resolve_model(cfg.model.name),
            cfg.rollout.engine,
            seed=cfg.seed,  # every request carries its own seed; this one only covers unseeded ones
            max_model_len=context_tokens(cfg),
            dtype=cfg.model.dtype,
            **({"gpu_memory_utilization": cfg.rollout.gpu_memory_utilization, "colocated": cfg.cluster.colocate,
                "prefix_caching": not cfg.rollout.deterministic} if cfg.rollout.engine == "vllm" else {}),
        )
        # Every task this worker holds (up to its lane capacity, each on its own actor thread)
        # generates through one scheduler: one continuous batch on the engine.
        self.scheduler = Scheduler(self.engine, threads=max(1, int(cfg.rollout.cpus_per_actor)), lockstep=cfg.rollout.deterministic)
        runner = EpisodeRunner(self.engine, cfg, self.scheduler)
        self.collector = GroupCollector(runner, make_answer_agent(cfg.reward.answer_agent), cfg)
        self.series = worker_series(self.run_name, self.worker_id, cfg.metrics.prometheus)
        self.pull_latest_policy()
        return self.info()

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"worker": self.worker_id, "engine": self.engine.name, "policy_version": self.engine.policy_version,
                "pid": os.getpid(), "node": ctx.get_node_id(),
                "transfer_backend": self.engine.transfer_backend, "weight_dtype": self.engine.weight_dtype}

    def run(self, task: Task, snapshot: MemoryBank | None = None) -> GlobalResult | LocalResult | EvalResult:
        """Run one task; a local task gets its anchor's snapshot (resolved by Ray from the keeper)."""
        self.pull_latest_policy()
        if isinstance(task, GlobalTask):
            published: list[ray.ObjectRef] = []
            result = self.collector.run_global(task.conv, task.horizon, task.n, task.task_id, keep=self._publisher(task, published))
            ray.get(published)  # the keeper holds every anchor's snapshot before the task counts as done
        elif isinstance(task, LocalTask):
            if snapshot is None:
                raise ValueError(f"local task {task.task_id} needs its anchor's snapshot")
            result = self.collector.run_local(task.conv, task.session, snapshot, task.anchor, task.m, task.task_id)
        elif isinstance(task, EvalTask):
            result = self.collector.evaluate(task.conv, task.horizon, task.seed_key)
        else:
            raise TypeError(f"not a rollout task: {task!r}")
        self.series.inc("worker_generated_tokens", result.stats.generated_tokens)
        return result

    def _publisher(self, task: GlobalTask, published: list[ray.ObjectRef]):
        """Before session t, hand the anchor rollout's M_{t-1} to the keeper by value. Not awaited
        here (that would stall the engine's batch): if this worker dies before the keeper has it,
        the task is re-run elsewhere and publishes it again."""
        wanted = {(a.session, a.rollout): a for a in task.anchors}

        def keep(session: Session, rollout: int, lane: Lane) -> None:
            anchor = wanted.get((session.index, rollout))
            if anchor is not None:
                published.append(self.keeper.publish.remote(anchor.snapshot_id, lane.bank))

        return keep

    def load_weights(self, wrapped_weights: list, version: int, only_if_newer: bool = False) -> int:
        weights = ray.get(wrapped_weights[0])
        if isinstance(weights, tuple):  # a copy the learner made on demand says which version it is
            version, weights = weights
        with self.scheduler.exclusive() as engine:
            # Tasks pull on their own threads: another one may have just loaded this version.
            if not (only_if_newer and version <= engine.policy_version):
                engine.load_weights(weights.items(), version)
        self.series.set("worker_policy_version", self.engine.policy_version)
        return self.engine.policy_version

    def pull_latest_policy(self) -> int:
        """Catch up with the published policy (a worker that started late or replaced a dead one)."""
        version, wrapped = ray.get(self.policy_store.latest.remote(self.engine.policy_version))
        if wrapped is not None and version > self.engine.policy_version:
            self.load_weights(wrapped, version, only_if_newer=True)
        self.series.set("worker_policy_version", self.engine.policy_version)
        return self.engine.policy_version

    # A collective weight sync (learner.weight_sync): learner rank 0 drives these through vLLM's Ray
    # client (learner.weight_transfer.FleetClient); the names are vLLM's LLM methods of the same use.

    def can_reach(self, address: tuple[str, int], timeout_s: float = 5.0) -> bool:
        """Whether a TCP connection to learner rank 0's port opens from here (before forming a group)."""
        try:
            with socket.create_connection(address, timeout=timeout_s):
                return True
        except OSError:
            return False

    def init_weight_transfer_engine(self, request) -> None:
        with self.scheduler.exclusive() as engine:
            engine.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        with self.scheduler.exclusive() as engine:
            engine.start_weight_update()

    def update_weights(self, request) -> None:
        with self.scheduler.exclusive() as engine:
            engine.update_weights(request)

    def finish_weight_update(self, version: int) -> int:
        with self.scheduler.exclusive() as engine:
            engine.finish_weight_update(version)
        self.series.set("worker_policy_version", version)
        return version

    def shutdown_weight_transfer_engine(self) -> None:
        with self.scheduler.exclusive() as engine:
            engine.shutdown_weight_transfer_engine()

    # Colocated (cluster.colocate): the engine sleeps through the learner's update, its weights wake
    # for the sync and its KV cache for the rollouts. False where the engine has no sleep mode (CPU).

    def sleep(self, level: int) -> bool:
        with self.scheduler.exclusive() as engine:
            return engine.sleep(level)

    def wake_up(self, tags: list[str]) -> bool:
        with self.scheduler.exclusive() as engine:
            return engine.wake_up(tags)

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        out: list[Generation] = []

        def program():
            out.append((yield Request(prompt, SamplingSpec(temperature=0.0, max_new_tokens=max_new_tokens, seed=0))))

        self.scheduler.run([program()])
        return out[0].token_ids

    def batch_stats(self) -> dict:
        """How full this worker's engine batch has been (sequences in flight per engine step)."""
        stats = self.scheduler.stats
        return {"steps": stats.steps, "in_flight_mean": stats.in_flight_mean, "requests": stats.requests,
                "generated_tokens": stats.generated_tokens}

    def record_requests(self) -> None:
        """From now on keep every request sent to the engine, and count its batches afresh
        (`memr2 bench rollout`)."""
        self.scheduler.recorded, self.scheduler.stats = [], BatchStats()

    def replay_raw(self, concurrency: int) -> dict:
        """The recorded requests again, through vLLM's own `LLM.generate` in batches of
        `concurrency`, on this same engine and CPU: the limit the scheduler is measured against."""
        requests, self.scheduler.recorded = self.scheduler.recorded or [], None
        with self.scheduler.exclusive() as engine:
            engine.llm.reset_prefix_cache()  # the worker's run must not warm the replay's cache
            start, tokens = time.perf_counter(), 0
            for i in range(0, len(requests), concurrency):
                tokens += engine.raw_generate(requests[i : i + concurrency])
            return {"requests": len(requests), "generated_tokens": tokens, "wall_s": time.perf_counter() - start}

    def weight_fingerprint(self) -> str:
        with self.scheduler.exclusive() as engine:
            return engine.weight_fingerprint()
