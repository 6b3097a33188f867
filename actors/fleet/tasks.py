"""A step's rollout work as tasks with stable ids, which any live worker can run.

    global task  step{s}/global/{conv}                   n lanes over the horizon -> global groups
    local task   step{s}/local/{conv}/s{t}/anchor{i0}    m branches of session t from M_{t-1}
    eval task    eval{r}/{conv}                          one rollout at the eval temperature
                 step{s}/eval/{conv}                     the same, dealt in step s's round (with_validation)

A task's lanes (n, m, 1) are the sequences it keeps in flight on an engine: what a worker's
capacity and the fleet's size are counted in (actors.fleet.slots.lane_capacity).

Every sampling seed derives from the task (its id, or for validation the conversation), never
from the worker, so a task re-run elsewhere after a failure sends the same requests. The anchors
are drawn before any global rollout starts (the draw does not depend on their outcome): the global
task publishes each anchor's snapshot M_{t-1} as soon as it exists, under the local task's id, and
that local task can start then instead of after every global rollout.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from actors.agent.episode import request_seed
from common.config import Config
from common.types import Conversation


@dataclass(frozen=True, slots=True)
class Anchor:
    session: int  # t: the session the local group re-runs
    rollout: int  # i0: the global rollout whose M_{t-1} it starts from
    snapshot_id: str  # where that snapshot is published: the local task's id


@dataclass(frozen=True, slots=True)
class GlobalTask:
    task_id: str
    conv: Conversation
    horizon: int
    n: int
    anchors: tuple[Anchor, ...]

    @property
    def lanes(self) -> int:
        return self.n


@dataclass(frozen=True, slots=True)
class LocalTask:
    task_id: str
    conv: Conversation
    session: int
    anchor: int
    m: int

    @property
    def snapshot_id(self) -> str:
        return self.task_id

    @property
    def lanes(self) -> int:
        return self.m


@dataclass(frozen=True, slots=True)
class EvalTask:
    task_id: str
    conv: Conversation
    horizon: int

    @property
    def lanes(self) -> int:
        return 1

    @property
    def seed_key(self) -> str:
        # The same requests at every validation round, so rounds differ only by the policy.
        return f"eval/{self.conv.sample_id}"


Task = GlobalTask | LocalTask | EvalTask


@dataclass(frozen=True, slots=True)
class StepPlan:
    step: int
    global_tasks: tuple[GlobalTask, ...]
    local_tasks: tuple[LocalTask, ...]
    # A validation on the weights these rollouts use, dealt in the same round (with_validation).
    validation: tuple[EvalTask, ...] = ()

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.global_tasks + self.local_tasks + self.validation

    @property
    def prefix(self) -> str:
        return f"step{self.step}/"


def plan_step(cfg: Config, conversations: Sequence[Conversation], horizon: int, step: int) -> StepPlan:
    """One global task per conversation and, for each of its sessions with probability p_local,
    one local task from a randomly drawn anchor rollout."""
    r = cfg.rollout
    rng = random.Random(request_seed(cfg.seed, step, "local-groups"))
    global_tasks, local_tasks = [], []
    for conv in conversations:
        gid = f"step{step}/global/{conv.sample_id}"
        anchors = []
        for session in conv.sessions[: min(horizon, len(conv.sessions))]:
            if rng.random() >= cfg.algo.local_prob:
                continue
            i0 = rng.randrange(r.n_global)
            local = LocalTask(f"step{step}/local/{conv.sample_id}/s{session.index}/anchor{i0}", conv, session.index, i0, r.m_local)
            anchors.append(Anchor(session.index, i0, local.snapshot_id))
            local_tasks.append(local)
        global_tasks.append(GlobalTask(gid, conv, horizon, r.n_global, tuple(anchors)))
    return StepPlan(step, tuple(global_tasks), tuple(local_tasks))


def plan_validation(conversations: Sequence[Conversation], horizon: int, round_: int) -> list[EvalTask]:
    return [EvalTask(f"eval{round_}/{c.sample_id}", c, horizon) for c in conversations]


def with_validation(plan: StepPlan, conversations: Sequence[Conversation], horizon: int) -> StepPlan:
    """`plan` with a validation of the policy its rollouts use, in their round: the engines batch
    both at once instead of running each half-full (what a validation round alone does: one lane
    per conversation). Its requests are those of any other round (EvalTask.seed_key)."""
    tasks = tuple(EvalTask(f"{plan.prefix}eval/{c.sample_id}", c, horizon) for c in conversations)
    return replace(plan, validation=tasks)
