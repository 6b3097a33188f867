"""A step's rollout batch, assembled from its tasks' results in plan order.

Results arrive in whatever order workers finish them; the batch is built in the plan's order
(global tasks by conversation, then local tasks as drawn), so the learner sees the same rows in
the same order however the work was spread, retried or scaled.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

from actors.agent.groups import EvalResult, GlobalResult, Group, LaneStats, LocalResult
from actors.fleet.tasks import StepPlan


@dataclass(slots=True)
class RolloutBatch:
    groups: list[Group] = field(default_factory=list)  # the groups with signal
    group_ids: list[str] = field(default_factory=list)  # every group's id, degenerate ones too
    degenerate_groups: int = 0
    global_groups: int = 0
    local_groups: int = 0
    episodes: int = 0  # global rollouts + local branches
    snapshot_forks: int = 0  # branches forked from an anchor's snapshot
    stats: LaneStats = field(default_factory=LaneStats)
    final_f1: list[float] = field(default_factory=list)  # terminal-memory F1 per global rollout
    m_fail: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    policy_versions: set[int] = field(default_factory=set)  # of every group, kept or not
    rewards: list[float] = field(default_factory=list)  # of every rollout and branch, kept or not
    validation: list[EvalResult] = field(default_factory=list)  # the plan's, in its order

    @classmethod
    def assemble(cls, plan: StepPlan, results: Mapping[str, GlobalResult | LocalResult | EvalResult]) -> RolloutBatch:
        batch = cls(validation=[results[t.task_id] for t in plan.validation])
        for task in plan.global_tasks:
            result = results[task.task_id]
            batch.episodes += task.n
            batch.final_f1 += [s.f1 for s in result.final_scores]
            batch.m_fail += [s.m_fail for s in result.final_scores]
            _merge(batch.stats, result.stats)
            for group in result.groups:
                batch.global_groups += 1
                batch._keep(group)
        for task in plan.local_tasks:
            result = results[task.task_id]
            batch.local_groups += 1
            batch.snapshot_forks += task.m
            batch.episodes += task.m
            _merge(batch.stats, result.stats)
            batch._keep(result.group)
        return batch

    def _keep(self, group: Group) -> None:
        self.group_ids.append(group.group_id)
        self.policy_versions.add(group.policy_version)
        self.rewards += group.rewards
        if group.degenerate():
            self.degenerate_groups += 1
        else:
            self.groups.append(group)

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
            "answer_retries": s.answer_retries,  # the answer agent's endpoint: re-sent requests
            "answer_failures": s.answer_failures,  # and requests that met an error (then answered)
            # Summed over tasks, so seconds of workers, not of the wall: where the rollouts' time
            # went, generating (the engine) or scoring (answer agent, rewards, oracle).
            "generate_s": s.generate_s,
            "score_s": s.score_s,
            "global_groups": self.global_groups,
            "local_groups": self.local_groups,
            "degenerate_groups": self.degenerate_groups,
            "snapshot_forks": self.snapshot_forks,
            "reward_mean": statistics.fmean(self.rewards) if self.rewards else 0.0,  # degenerate groups too
            "final_f1_mean": statistics.fmean(self.final_f1) if self.final_f1 else 0.0,
            "m_fail_mean": statistics.fmean(self.m_fail) if self.m_fail else 0.0,
        }


def _merge(into: LaneStats, other: LaneStats) -> None:
    for name in LaneStats.__slots__:
        setattr(into, name, getattr(into, name) + getattr(other, name))
