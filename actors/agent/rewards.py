"""Rewards for memory quality (DESIGN §2-§3): answer F1 minus a compression penalty, and M-Fail.

Which questions score which memory:
  global group (conv, t): the terminal memory M_T on Q_t, the questions whose latest evidence lies
                          in session t (they became answerable there);
  local group (conv, t):  the branched memory M_t on every question answerable from sessions 1..t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.config import RewardConfig
from common.scoring import locomo_f1
from common.text import count_tokens
from common.types import QA, Conversation
from memory_service.bank import MemoryBank


@dataclass(frozen=True, slots=True)
class MemoryScore:
    reward: float  # mean F1 - lam * Comp
    f1: float
    compression: float
    m_fail: float
    questions: int
    # Per question, in order: validation pools F1 across conversations; eval reports all three.
    f1s: tuple[float, ...] = ()
    predictions: tuple[str, ...] = ()
    m_fails: tuple[float, ...] = ()
    memory_tokens: int = 0


def answer_session(qa: QA) -> int | None:
    """The session in which a question becomes answerable: its latest evidence session."""
    sessions = qa.evidence_sessions()
    return max(sessions) if sessions else None


def scored_questions(conv: Conversation, exclude_adversarial: bool) -> list[QA]:
    """Questions that can score a memory: with evidence, and not adversarial if excluded."""
    return [q for q in conv.qa if answer_session(q) is not None and not (exclude_adversarial and q.category == 5)]


def final_questions(conv: Conversation, horizon: int, exclude_adversarial: bool) -> list[QA]:
    """What the final memory M_T is asked (global rollouts, validation, `memr2 eval`): everything
    answerable by session T."""
    return questions_up_to(scored_questions(conv, exclude_adversarial), min(horizon, len(conv.sessions)))


def questions_of_session(questions: Sequence[QA], t: int) -> list[QA]:
    return [q for q in questions if answer_session(q) == t]


def questions_up_to(questions: Sequence[QA], t: int) -> list[QA]:
    return [q for q in questions if answer_session(q) <= t]


def dialogue_tokens(conv: Conversation, t: int) -> int:
    """L_{1..t}: tokens of the dialogue seen in sessions 1..t (same counter as the bank's)."""
    return sum(count_tokens(turn.text) for s in conv.sessions[:t] for turn in s.turns)


def compression(bank: MemoryBank, seen_tokens: int, alpha: float) -> float:
    """Comp(M, t) = max(0, (tokens(M) - alpha * L_1..t) / L_1..t)."""
    if seen_tokens <= 0:
        return 0.0
    return max(0.0, (bank.tokens - alpha * seen_tokens) / seen_tokens)


def score_predictions(questions: Sequence[QA], predictions: Sequence[str]) -> list[float]:
    return [locomo_f1(p, q.answer, q.category) for q, p in zip(questions, predictions, strict=True)]


def memory_score(bank: MemoryBank, questions: Sequence[QA], predictions: Sequence[str], seen_tokens: int, cfg: RewardConfig) -> MemoryScore:
    f1s = score_predictions(questions, predictions)
    f1 = sum(f1s) / len(f1s) if f1s else 0.0
    comp = compression(bank, seen_tokens, cfg.alpha)
    evidence = [e for q in questions for e in q.evidence]
    return MemoryScore(f1 - cfg.lam * comp, f1, comp, bank.m_fail(evidence), len(questions), tuple(f1s),
                       tuple(predictions), tuple(bank.m_fail(q.evidence) for q in questions), bank.tokens)
