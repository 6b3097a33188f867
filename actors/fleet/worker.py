"""The rollout worker: a Ray actor owning one engine and one answer agent, running any task.

A worker holds no state a step depends on: the snapshots its global tasks take for local tasks go
to the step's snapshot keeper as soon as they exist, and its results go back to the driver with
the task. So the fleet may drop it at any moment and re-run its tasks elsewhere. It pulls the
latest policy from the policy store when it starts and before every task, so a replacement or an
autoscaled worker never generates with a stale policy unawares.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ray
import torch

from actors.agent.answer_agent import make_answer_agent
from actors.agent.episode import EpisodeRunner, Lane
from actors.agent.groups import GlobalResult, GroupCollector, LocalResult
from actors.agent.rewards import MemoryScore
from actors.engines.base import SamplingSpec
from actors.engines.factory import make_engine
from actors.engines.models import resolve_model
from actors.fleet.metrics import worker_series
from actors.fleet.tasks import EvalTask, GlobalTask, LocalTask, Task
from common.config import Config
from common.types import Session
from memory_service.bank import MemoryBank


class RolloutWorker:
    def __init__(self, cfg: Config, worker_id: str, run: str, keeper: ray.actor.ActorHandle, policy_store: ray.actor.ActorHandle) -> None:
        # Ray sets OMP_NUM_THREADS=1 in actors; give torch the CPUs this actor reserved.
        torch.set_num_threads(max(1, int(cfg.rollout.cpus_per_actor)))
        self.cfg, self.worker_id = cfg, worker_id
        self.keeper, self.policy_store = keeper, policy_store
        self.engine = make_engine(
            resolve_model(cfg.model.name),
            cfg.rollout.engine,
            seed=cfg.seed,  # every request carries its own seed; this one only covers unseeded ones
            max_model_len=cfg.model.max_prompt_tokens + cfg.rollout.max_new_tokens,
            dtype=cfg.model.dtype,
        )
        self.collector = GroupCollector(EpisodeRunner(self.engine, cfg), make_answer_agent(cfg.reward.answer_agent), cfg)
        self.series = worker_series(run, worker_id, cfg.metrics.prometheus)
        self.pull_latest_policy()

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"worker": self.worker_id, "engine": self.engine.name, "policy_version": self.engine.policy_version,
                "pid": os.getpid(), "node": ctx.get_node_id()}

    def run(self, task: Task, snapshot: MemoryBank | None = None) -> GlobalResult | LocalResult | MemoryScore:
        """Run one task; a local task gets its anchor's snapshot (resolved by Ray from the keeper)."""
        self.pull_latest_policy()
        if isinstance(task, GlobalTask):
            result = self.collector.run_global(task.conv, task.horizon, task.n, task.task_id, keep=self._publisher(task))
        elif isinstance(task, LocalTask):
            if snapshot is None:
                raise ValueError(f"local task {task.task_id} needs its anchor's snapshot")
            result = self.collector.run_local(task.conv, task.session, snapshot, task.anchor, task.m, task.task_id)
        elif isinstance(task, EvalTask):
            return self.collector.evaluate(task.conv, task.horizon, task.seed_key)
        else:
            raise TypeError(f"not a rollout task: {task!r}")
        self.series.inc("worker_generated_tokens", result.stats.generated_tokens)
        return result

    def _publisher(self, task: GlobalTask):
        """Before session t, hand each anchor's M_{t-1} to the keeper (and wait until it holds it:
        a snapshot still in flight would die with this worker)."""
        wanted = {a.session: a for a in task.anchors}

        def keep(session: Session, lanes: Sequence[Lane]) -> None:
            anchor = wanted.get(session.index)
            if anchor is not None:
                ray.get(self.keeper.publish.remote(anchor.snapshot_id, lanes[anchor.rollout].bank))

        return keep

    def load_weights(self, wrapped_weights: list, version: int) -> int:
        weights = ray.get(wrapped_weights[0])
        self.engine.load_weights(weights.items(), version)
        self.series.set("worker_policy_version", version)
        return version

    def pull_latest_policy(self) -> int:
        """Catch up with the published policy (a worker that started late or replaced a dead one)."""
        version, wrapped = ray.get(self.policy_store.latest.remote())
        if wrapped is not None and version > self.engine.policy_version:
            self.load_weights(wrapped, version)
        self.series.set("worker_policy_version", self.engine.policy_version)
        return self.engine.policy_version

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        return self.engine.generate([prompt], SamplingSpec(temperature=0.0, max_new_tokens=max_new_tokens))[0].token_ids

    def weight_fingerprint(self) -> str:
        return self.engine.weight_fingerprint()
