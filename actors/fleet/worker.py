"""The rollout worker: a Ray actor owning one engine, one answer agent and one snapshot store.

Group tables leave the actor through the object store (`ray.put` here, refs to the driver), so
token ids never pass through the driver on their way to the learner.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace

import ray
import torch

from actors.agent.answer_agent import make_answer_agent
from actors.engines.base import SamplingSpec
from actors.engines.factory import make_engine
from actors.agent.episode import EpisodeRunner
from actors.agent.groups import GlobalResult, Group, GroupCollector, LaneStats
from actors.fleet.policy_store import policy_store
from actors.agent.rewards import MemoryScore
from actors.engines.models import resolve_model
from common.config import Config
from common.types import Conversation
from memory_service.snapshots import SnapshotStore


class RolloutWorker:
    def __init__(self, cfg: Config, index: int) -> None:
        # Ray sets OMP_NUM_THREADS=1 in actors; give torch the CPUs this actor reserved.
        torch.set_num_threads(max(1, int(cfg.rollout.cpus_per_actor)))
        self.cfg, self.index = cfg, index
        model_dir = resolve_model(cfg.model.name)
        self.engine = make_engine(
            model_dir,
            cfg.rollout.engine,
            seed=cfg.seed + index,
            max_model_len=cfg.model.max_prompt_tokens + cfg.rollout.max_new_tokens,
            dtype=cfg.model.dtype,
        )
        answer_agent = make_answer_agent(cfg.reward.answer_agent)
        self.store = SnapshotStore(f"w{index}-{uuid.uuid4().hex[:6]}")
        self.collector = GroupCollector(EpisodeRunner(self.engine, cfg), answer_agent, self.store, cfg)

    def info(self) -> dict:
        return {"index": self.index, "engine": self.engine.name, "policy_version": self.engine.policy_version, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def run_global(self, conv: Conversation, horizon: int, n: int, step: int) -> GlobalResult:
        self.pull_latest_policy()
        result = self.collector.run_global(conv, horizon, n, step)
        result.groups = [_to_object_store(g) for g in result.groups]
        return result

    def run_local(self, conv: Conversation, t: int, snapshot_id: str, anchor: int, m: int, step: int) -> tuple[Group, LaneStats, int]:
        self.pull_latest_policy()
        group, stats = self.collector.run_local(conv, t, snapshot_id, anchor, m, step)
        return _to_object_store(group), stats, m

    def evaluate(self, conv: Conversation, horizon: int) -> MemoryScore:
        """One greedy rollout over the horizon; its terminal memory scored on every question."""
        self.pull_latest_policy()
        return self.collector.evaluate(conv, horizon)

    def load_weights(self, wrapped_weights: list, version: int) -> int:
        weights = ray.get(wrapped_weights[0])
        self.engine.load_weights(weights.items(), version)
        return version

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        return self.engine.generate([prompt], SamplingSpec(temperature=0.0, max_new_tokens=max_new_tokens))[0].token_ids

    def weight_fingerprint(self) -> str:
        return self.engine.weight_fingerprint()

    def pull_latest_policy(self) -> int:
        """Catch up with the published policy (a worker that started or restarted late)."""
        version, wrapped = ray.get(policy_store().latest.remote())
        if wrapped is not None and version > self.engine.policy_version:
            self.load_weights(wrapped, version)
        return self.engine.policy_version

    def share_snapshot(self, snapshot_id: str) -> None:
        self.store.share(snapshot_id)

    def snapshots_taken(self) -> int:
        return self.store.forks

    def release_snapshots(self) -> None:
        self.store.release_all()


def _to_object_store(group: Group) -> Group:
    return replace(group, table=ray.put(group.table))
