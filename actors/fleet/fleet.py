"""The driver's side of rollouts: a pool of rollout workers fed conversations.

One collection step: every conversation's n global rollouts run on one worker (so a batched
generate covers all n lanes); then its local groups are drawn (per session t with probability
p_local, one anchor rollout) and spread over the pool, starting at another worker than the
anchor's, which then restores the anchor's snapshot by id through the registry.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

import ray

from actors.agent.episode import request_seed
from actors.agent.groups import GlobalResult, Group, LaneStats
from actors.fleet.policy_store import policy_store
from actors.agent.rewards import MemoryScore
from actors.fleet.worker import RolloutWorker
from common.config import Config
from common.types import Conversation
from memory_service.snapshots import snapshot_registry


def worker_resources(cfg: Config) -> dict[str, float]:
    return {"CPU": cfg.rollout.cpus_per_actor, "GPU": cfg.rollout.gpus_per_actor}


@dataclass(slots=True)
class RolloutBatch:
    groups: list[Group]  # the groups with signal; tables are object refs
    degenerate_groups: int = 0
    global_groups: int = 0
    local_groups: int = 0
    episodes: int = 0  # global rollouts + local branches
    snapshot_forks: int = 0  # branches forked from a stored snapshot
    cross_actor_restores: int = 0
    stats: LaneStats = field(default_factory=LaneStats)
    final_f1: list[float] = field(default_factory=list)  # terminal-memory F1 per global rollout
    m_fail: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    policy_versions: set[int] = field(default_factory=set)  # of every group, kept or not
    rewards: list[float] = field(default_factory=list)  # of every rollout and branch, kept or not
    anchors: list[tuple[int, Conversation]] = field(default_factory=list)  # (owner worker, conversation)
    snapshots: list[list[list[str]]] = field(default_factory=list)  # per conversation: [rollout][t-1]

    def summary(self) -> dict:
        """The batch's numbers, as `memr2 rollout` prints them and every training step logs them."""
        s = self.stats
        return {
            "episodes": self.episodes,
            "steps": s.steps,
            "generated_tokens": s.generated_tokens,
            "tokens_per_s": s.generated_tokens / self.wall_s if self.wall_s else 0.0,
            "format_failures": s.format_failures,
            "rejected_items": s.rejected_items,
            "global_groups": self.global_groups,
            "local_groups": self.local_groups,
            "degenerate_groups": self.degenerate_groups,
            "snapshot_forks": self.snapshot_forks,
            "cross_actor_restores": self.cross_actor_restores,
            "reward_mean": statistics.fmean(self.rewards) if self.rewards else 0.0,  # degenerate groups too
            "final_f1_mean": statistics.fmean(self.final_f1) if self.final_f1 else 0.0,
            "m_fail_mean": statistics.fmean(self.m_fail) if self.m_fail else 0.0,
        }


class RolloutPool:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # Created here so the driver owns them: they must outlive any one worker.
        self.registry, self.policy_store = snapshot_registry(), policy_store()
        remote_cls = ray.remote(RolloutWorker)
        need = worker_resources(cfg)
        self.workers = [
            remote_cls.options(num_cpus=need["CPU"], num_gpus=need["GPU"]).remote(cfg, i) for i in range(cfg.rollout.num_actors)
        ]
        self.infos = ray.get([w.info.remote() for w in self.workers])

    @property
    def engine(self) -> str:
        return self.infos[0]["engine"]

    def collect(self, conversations: list[Conversation], horizon: int, step: int) -> RolloutBatch:
        """Global rollouts, then local rerollouts, then the snapshots are released."""
        batch = self.rollouts(conversations, horizon, step)
        self.local_rerollouts(batch, step)
        return batch

    def rollouts(self, conversations: list[Conversation], horizon: int, step: int) -> RolloutBatch:
        """n global rollouts per conversation (rewards r_G scored in the actors); every rollout's
        snapshot before each session stays in its actor for the local rerollouts."""
        start = time.perf_counter()
        batch = RolloutBatch(groups=[])
        refs = []
        for j, conv in enumerate(conversations):
            owner = j % len(self.workers)
            refs.append(self.workers[owner].run_global.remote(conv, horizon, self.cfg.rollout.n_global, step))
            batch.anchors.append((owner, conv))
        for result in ray.get(refs):
            self._take_global(batch, result)
        batch.wall_s = time.perf_counter() - start
        return batch

    def local_rerollouts(self, batch: RolloutBatch, step: int) -> None:
        """For each session t with probability p_local: one anchor rollout's snapshot M_{t-1},
        re-run m times for session t alone (rewards r_L on the branched M_t)."""
        start = time.perf_counter()
        r = self.cfg.rollout
        rng = random.Random(request_seed(self.cfg.seed, step, "local-groups"))
        refs, turn = [], 0
        for (owner, conv), snapshots in zip(batch.anchors, batch.snapshots, strict=True):
            for t_pos in range(len(snapshots[0])):
                if rng.random() >= self.cfg.algo.local_prob:
                    continue
                anchor = rng.randrange(r.n_global)
                snapshot_id = snapshots[anchor][t_pos]
                target = (owner + 1 + turn) % len(self.workers)  # spread, starting at another actor
                turn += 1
                if target != owner:
                    ray.get(self.workers[owner].share_snapshot.remote(snapshot_id))
                    batch.cross_actor_restores += 1
                session = conv.sessions[t_pos].index
                refs.append(self.workers[target].run_local.remote(conv, session, snapshot_id, anchor, r.m_local, step))
        for group, stats, forks in ray.get(refs):
            batch.local_groups += 1
            batch.snapshot_forks += forks
            batch.episodes += forks
            _merge(batch.stats, stats)
            self._keep(batch, group)
        ray.get([w.release_snapshots.remote() for w in self.workers])
        batch.wall_s += time.perf_counter() - start

    def _take_global(self, batch: RolloutBatch, result: GlobalResult) -> None:
        batch.episodes += len(result.snapshots)
        batch.snapshots.append(result.snapshots)
        batch.final_f1 += [s.f1 for s in result.final_scores]
        batch.m_fail += [s.m_fail for s in result.final_scores]
        _merge(batch.stats, result.stats)
        for group in result.groups:
            batch.global_groups += 1
            self._keep(batch, group)

    @staticmethod
    def _keep(batch: RolloutBatch, group: Group) -> None:
        batch.policy_versions.add(group.policy_version)
        batch.rewards += group.rewards
        if group.degenerate():
            batch.degenerate_groups += 1
        else:
            batch.groups.append(group)

    def evaluate(self, conversations: list[Conversation], horizon: int) -> list[MemoryScore]:
        """Greedy validation rollouts, spread over the pool; one score per conversation."""
        refs = [self.workers[j % len(self.workers)].evaluate.remote(c, horizon) for j, c in enumerate(conversations)]
        return ray.get(refs)

    def load_weights(self, wrapped_weights: list, version: int) -> None:
        """Every live worker takes the new weights (one object in the store, fetched per node)."""
        ray.get([w.load_weights.remote(wrapped_weights, version) for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)


def _merge(into: LaneStats, other: LaneStats) -> None:
    for name in LaneStats.__slots__:
        setattr(into, name, getattr(into, name) + getattr(other, name))
