"""Oracle scores: how good one extractor or manager step was, against a synthetic world's ground
truth. They exist to check credit assignment (learner.credit), never to train on.

A conversation with gold operations (a synthetic world's, common.synth) says for every turn which
facts it states and what an ideal manager does with them. So for every step:

  extractor  soft F1 of the facts it produced (parsed) against the gold facts of the turns it read
             (the gold operations' contents, as the warm start teaches them: actors.agent.supervision);
  manager    soft F1 of the memory bank's contents after its operations against the gold bank after
             the same turns: the gold INSERT / UPDATE / DELETE replayed by key over every turn up to
             and including the last turn the step read.

Soft F1 of produced texts P against gold texts G, with LoCoMo's token F1 (common.scoring):
  precision = mean over p in P of max over g in G of F1(p, g)
  recall    = mean over g in G of max over p in P of F1(p, g)
  soft F1   = 2 * precision * recall / (precision + recall), 0 when both are 0;
  P and G both empty: 1.0 (nothing to extract, nothing extracted); exactly one empty: 0.0.

The gold side is replayed and tokenised once per conversation (`Oracle.of`, a task's start), so a
step's score is a lookup plus tokenising what the step itself produced.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from common.scoring import bags_f1, token_bag
from common.types import Conversation, Fact, Turn
from memory_service.bank import MemoryBank

Bag = Counter[str]


def soft_f1(produced: Sequence[Bag], gold: Sequence[Bag]) -> float:
    """The soft F1 above, on token bags."""
    if not produced or not gold:
        return float(not produced and not gold)
    scores = [[bags_f1(p, g) for g in gold] for p in produced]
    precision = sum(max(row) for row in scores) / len(produced)
    recall = sum(max(row[j] for row in scores) for j in range(len(gold))) / len(gold)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def soft_f1_texts(produced: Iterable[str], gold: Iterable[str]) -> float:
    return soft_f1([token_bag(t) for t in produced], [token_bag(t) for t in gold])


@dataclass(frozen=True, slots=True)
class Oracle:
    """One conversation's gold side, by dia_id: the facts each turn states, and the gold bank's
    contents after each turn (token bags)."""

    facts: Mapping[str, tuple[Bag, ...]]
    bank_after: Mapping[str, tuple[Bag, ...]]

    @classmethod
    def of(cls, conv: Conversation) -> Oracle | None:
        """None for a conversation without gold operations (LoCoMo): its steps' oracle is NaN."""
        if not conv.gold_operations:
            return None
        ops_by_dia = defaultdict(list)
        for op in conv.gold_operations:
            ops_by_dia[op.dia_id].append(op)
        facts: dict[str, tuple[Bag, ...]] = {}
        bank_after: dict[str, tuple[Bag, ...]] = {}
        bank: dict[str, Bag] = {}  # the world's slot ("alice.city") -> its memory's content
        for session in conv.sessions:
            for turn in session.turns:
                gold = ops_by_dia.get(turn.dia_id, [])
                facts[turn.dia_id] = tuple(token_bag(op.content) for op in gold)
                for op, bag in zip(gold, facts[turn.dia_id]):
                    if op.op == "DELETE":
                        bank.pop(op.key, None)
                    else:  # INSERT creates the slot's memory, UPDATE rewrites it
                        bank[op.key] = bag
                bank_after[turn.dia_id] = tuple(bank.values())  # shares the bags: no copies per turn
        return cls(MappingProxyType(facts), MappingProxyType(bank_after))

    def extractor(self, turns: Sequence[Turn], produced: Sequence[Fact]) -> float:
        gold = [bag for turn in turns for bag in self.facts.get(turn.dia_id, ())]
        return soft_f1([token_bag(f.fact) for f in produced], gold)

    def manager(self, turns: Sequence[Turn], bank: MemoryBank) -> float:
        """`bank`: the lane's memory after the step's operations; `turns`: what its extractor read."""
        return soft_f1([token_bag(m.content) for m in bank], self.bank_after.get(turns[-1].dia_id, ()))
