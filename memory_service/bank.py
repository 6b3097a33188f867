"""The memory bank: an immutable snapshot of memories plus the retrieval index that belongs to it.

Every operation returns a new bank and leaves the old one untouched; both share all unchanged
structure (persistent hash-array-mapped tries from `immutables`). Hence a snapshot `M_{t-1}` kept
for local rerollouts costs nothing to hold, and `fork()` is O(1) whatever the bank's size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import immutables

from common.text import count_tokens
from common.types import MemoryItem, Operation
from memory_service.retrieval import BM25Index, RetrievalIndex, make_index


class InvalidOperation(ValueError):
    """A memory operation that cannot apply (unknown id, missing content); the bank is unchanged."""


@dataclass(frozen=True, slots=True)
class MemoryBank:
    items: immutables.Map = field(default_factory=immutables.Map)  # memory_id -> MemoryItem
    index: RetrievalIndex = field(default_factory=BM25Index)
    next_id: int = 0  # ids are never reused within a lineage, so a stale id can't hit a new memory
    tokens: int = 0  # token count of all contents, kept incrementally for the compression penalty

    @classmethod
    def empty(cls, retriever: str = "bm25") -> MemoryBank:
        return cls(index=make_index(retriever))

    def fork(self) -> MemoryBank:
        """A new handle on the same state: O(1), nothing is copied."""
        return replace(self)

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[MemoryItem]:
        """Memories in the order they were first inserted (a hash map alone has no order)."""
        return iter(sorted(self.items.values(), key=lambda m: int(m.id)))

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self.items

    def get(self, memory_id: str) -> MemoryItem:
        try:
            return self.items[memory_id]
        except KeyError:
            raise InvalidOperation(f"unknown memory id {memory_id!r}") from None

    def retrieve(self, text: str, k: int, speaker: str | None = None) -> list[MemoryItem]:
        """Top-k memories related to `text`, optionally only those about one speaker."""
        allow = None if speaker is None else (lambda m: self.items[m].speaker == speaker)
        return [self.items[m] for m, _ in self.index.search(text, k, allow)]

    def covered_dia_ids(self) -> set[str]:
        return {d for item in self.items.values() for d in item.dia_ids}

    def m_fail(self, evidence: Iterable[str]) -> float:
        """Fraction of gold evidence dia_ids that no memory cites (DESIGN §2); 0 for no evidence."""
        wanted = set(evidence)
        if not wanted:
            return 0.0
        return len(wanted - self.covered_dia_ids()) / len(wanted)

    def as_dict(self) -> dict[str, dict]:
        """A plain picture of the contents, for equality checks and logs (ids -> fields)."""
        return {m.id: {"speaker": m.speaker, "content": m.content, "session_time": m.session_time, "dia_ids": m.dia_ids} for m in self}

    # -- writing ---------------------------------------------------------------------------------
    def apply(self, op: Operation, session_time: str = "") -> MemoryBank:
        """The bank after `op`; raises InvalidOperation and changes nothing if it cannot apply."""
        kind = op.op
        if kind == "NOOP":
            return self
        if kind == "INSERT":
            return self._insert(op, session_time)
        if kind == "UPDATE":
            return self._update(op, session_time)
        if kind == "DELETE":
            return self._delete(op)
        raise InvalidOperation(f"unknown operation {kind!r}")

    def apply_all(self, ops: Iterable[Operation], session_time: str = "") -> tuple[MemoryBank, list[str]]:
        """Apply what can be applied; return the new bank and one error line per rejected op."""
        bank, errors = self, []
        for op in ops:
            try:
                bank = bank.apply(op, session_time)
            except InvalidOperation as err:
                errors.append(str(err))
        return bank, errors

    def _insert(self, op: Operation, session_time: str) -> MemoryBank:
        content = _content(op)
        if not op.speaker:
            raise InvalidOperation("INSERT needs a speaker")
        memory_id = str(self.next_id)
        item = MemoryItem(memory_id, op.speaker, content, session_time, _dia(op.dia_id))
        return MemoryBank(
            self.items.set(memory_id, item),
            self.index.add(memory_id, content),
            self.next_id + 1,
            self.tokens + count_tokens(content),
        )

    def _update(self, op: Operation, session_time: str) -> MemoryBank:
        old = self.get(op.memory_id or "")
        content = _content(op)
        # The update keeps its provenance: M-Fail asks whether the bank still cites each turn.
        dia_ids = old.dia_ids + tuple(d for d in _dia(op.dia_id) if d not in old.dia_ids)
        new = replace(old, content=content, session_time=session_time or old.session_time, dia_ids=dia_ids)
        return MemoryBank(
            self.items.set(old.id, new),
            self.index.remove(old.id, old.content).add(old.id, content),
            self.next_id,
            self.tokens - count_tokens(old.content) + count_tokens(content),
        )

    def _delete(self, op: Operation) -> MemoryBank:
        old = self.get(op.memory_id or "")
        return MemoryBank(
            self.items.delete(old.id),
            self.index.remove(old.id, old.content),
            self.next_id,
            self.tokens - count_tokens(old.content),
        )


def _content(op: Operation) -> str:
    content = (op.content or "").strip()
    if not content:
        raise InvalidOperation(f"{op.op} needs non-empty content")
    return content


def _dia(dia_id: str | None) -> tuple[str, ...]:
    return (dia_id,) if dia_id else ()
