"""Supervised targets from a synthetic world's ground truth, for the warm start.

The episode is replayed exactly as a rollout sees it (same chunks, same prompts, same retrieval of
related memories), but with the ideal outputs: the gold facts of each chunk for the extractor and
the gold operations for the manager, applied to a bank so later prompts show the right memories.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from actors.agent.episode import split_chunks
from actors.agent.prompts import extractor_messages, manager_messages, render_facts, render_operations
from common.config import Config
from common.types import Conversation, Fact, GoldOperation, MemoryItem, Operation
from memory_service.bank import MemoryBank


@dataclass(frozen=True, slots=True)
class Example:
    role: str  # "extractor" | "manager"
    system: str
    user: str
    target: str


def supervised_examples(conv: Conversation, cfg: Config, horizon: int | None = None) -> list[Example]:
    if not conv.gold_operations:
        raise ValueError(f"conversation {conv.sample_id} has no gold operations (only synthetic worlds do)")
    ops_by_dia: dict[str, list[GoldOperation]] = defaultdict(list)
    for op in conv.gold_operations:
        ops_by_dia[op.dia_id].append(op)
    bank, id_of = MemoryBank.empty(cfg.memory.retriever), {}
    examples = []
    for session in conv.sessions[:horizon]:
        for chunk in split_chunks(session.turns, cfg.rollout.chunks_per_session):
            gold = [op for turn in chunk for op in ops_by_dia.get(turn.dia_id, [])]
            facts = [Fact(op.speaker, op.dia_id, op.content) for op in gold]
            system, user = extractor_messages(cfg.model.prompt_size, session.date_time, chunk)
            examples.append(Example("extractor", system, user, render_facts(facts)))
            if not facts:
                continue
            related = [bank.retrieve(f.fact, cfg.memory.related_top_k) for f in facts]
            ops = []
            for i, op in enumerate(gold):
                if op.op == "INSERT":
                    ops.append(Operation("INSERT", speaker=op.speaker, content=op.content, dia_id=op.dia_id))
                    continue
                memory = bank.get(id_of[op.key])
                related[i] = _shown(related[i], memory, cfg.memory.related_top_k)
                content = op.content if op.op == "UPDATE" else None
                ops.append(Operation(op.op, memory_id=memory.id, content=content, dia_id=op.dia_id if content else None))
            system, user = manager_messages(cfg.model.prompt_size, facts, related)
            examples.append(Example("manager", system, user, render_operations(ops)))
            bank = _apply(bank, gold, ops, id_of, session.date_time)
    return examples


def _shown(related: list[MemoryItem], memory: MemoryItem, k: int) -> list[MemoryItem]:
    """The memory an UPDATE/DELETE names must be among those shown, as at rollout time it may not
    be retrieved; it takes the last place so the list keeps its size."""
    if any(m.id == memory.id for m in related):
        return related
    return [*related[: max(k - 1, 0)], memory]


def _apply(bank: MemoryBank, gold: list[GoldOperation], ops: list[Operation], id_of: dict[str, str], when: str) -> MemoryBank:
    for g, op in zip(gold, ops, strict=True):
        if op.op == "INSERT":
            id_of[g.key] = str(bank.next_id)
        elif op.op == "DELETE":
            del id_of[g.key]
        bank = bank.apply(op, when)
    return bank
