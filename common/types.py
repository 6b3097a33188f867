"""Data types shared by every layer: LoCoMo's conversation schema, memory items and operations,
and the step sample the learner consumes (one generation step with its advantage).

A batch of step samples travels as one Arrow table (`STEP_SCHEMA`), so trajectories cross the Ray
object store without pickling Python objects per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import pyarrow as pa

OpKind = Literal["INSERT", "UPDATE", "DELETE", "NOOP"]
Role = Literal["extractor", "manager"]
GroupKind = Literal["global", "local"]


@dataclass(frozen=True, slots=True)
class Turn:
    speaker: str
    dia_id: str  # "D3:6": session 3, turn 6
    text: str


@dataclass(frozen=True, slots=True)
class Session:
    index: int  # 1-based, as in LoCoMo's keys session_<index>
    date_time: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True, slots=True)
class QA:
    question: str
    answer: str  # "" for adversarial items, which carry adversarial_answer instead
    category: int  # 1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial
    evidence: tuple[str, ...]
    kind: str | None = None  # synthetic worlds name the question type, e.g. "knowledge-update"
    adversarial_answer: str | None = None

    def evidence_sessions(self) -> set[int]:
        return {s for s in (session_of(e) for e in self.evidence) if s is not None}


@dataclass(frozen=True, slots=True)
class GoldOperation:
    """What an ideal manager does for one fact of a synthetic world (warm-start supervision)."""

    session: int
    dia_id: str
    op: OpKind
    key: str  # the world's slot, e.g. "alice.city"; UPDATE/DELETE name the slot INSERT created
    speaker: str
    content: str
    value: str | None = None  # the slot's new value (INSERT/UPDATE), for checking answers


@dataclass(frozen=True, slots=True)
class Conversation:
    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: tuple[Session, ...]
    qa: tuple[QA, ...]
    gold_facts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # dia_id -> facts
    gold_operations: tuple[GoldOperation, ...] = ()

    def dia_ids(self) -> set[str]:
        return {t.dia_id for s in self.sessions for t in s.turns}


def session_of(dia_id: str) -> int | None:
    """Session number of a dia_id like "D3:6"; None for LoCoMo's few malformed ids."""
    head, sep, _ = dia_id.partition(":")
    if not sep or not head.startswith("D") or not head[1:].isdigit():
        return None
    return int(head[1:])


@dataclass(frozen=True, slots=True)
class Fact:
    """One atomic fact the extractor emitted for a chunk of dialogue."""

    speaker: str
    dia_id: str
    fact: str


@dataclass(frozen=True, slots=True)
class MemoryItem:
    id: str
    speaker: str
    content: str
    session_time: str
    dia_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Operation:
    """A memory manager's operation. INSERT needs speaker+content; UPDATE memory_id+content;
    DELETE memory_id; NOOP nothing."""

    op: OpKind
    memory_id: str | None = None
    speaker: str | None = None
    content: str | None = None
    dia_id: str | None = None


@dataclass(slots=True)
class StepSample:
    """One extractor or manager generation with everything the LoGo-GRPO loss needs."""

    role: Role
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # behaviour-policy logprob of each response token
    conversation: str
    session: int
    group_id: str  # global: "<conv>/s<t>"; local: "<conv>/s<t>/anchor<i>"
    group_kind: GroupKind
    rollout: int  # index of the rollout (global) or branch (local) within its group
    reward: float = 0.0
    advantage: float = 0.0
    policy_version: int = 0
    # Which decision point of the session: the extractor prompt's index (a manager step takes its
    # extractor's), the same in every rollout and branch of the group.
    chunk: int = 0
    # The step's quality against a synthetic world's gold (actors.agent.oracle), for measuring
    # credit assignment (learner.credit); NaN where the conversation has no gold operations.
    oracle: float = math.nan


STEP_SCHEMA = pa.schema(
    [
        ("role", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("logprobs", pa.list_(pa.float32())),
        ("conversation", pa.string()),
        ("session", pa.int32()),
        ("group_id", pa.string()),
        ("group_kind", pa.string()),
        ("rollout", pa.int32()),
        ("reward", pa.float64()),
        ("advantage", pa.float64()),
        ("policy_version", pa.int64()),
        ("chunk", pa.int32()),
        ("oracle", pa.float64()),
    ]
)


def samples_to_table(samples: list[StepSample]) -> pa.Table:
    return pa.Table.from_pylist([asdict(s) for s in samples], schema=STEP_SCHEMA)


def table_to_samples(table: pa.Table) -> list[StepSample]:
    if not table.schema.equals(STEP_SCHEMA):
        raise ValueError(f"step table schema differs from STEP_SCHEMA: {table.schema}")
    return [StepSample(**row) for row in table.to_pylist()]
