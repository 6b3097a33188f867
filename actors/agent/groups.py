"""Global and local groups of one conversation, as the learner receives them.

Global group (conv, t): the n full rollouts' steps of session t, each rewarded by r_G(i, t).
Local group (conv, t, anchor): m branches re-running only session t from the anchor rollout's
snapshot M_{t-1}, each rewarded on the branched M_t. Every group leaves as one Arrow table.

Sampling seeds derive from the caller's `key` (the task's id) and the lane, never from which
engine or worker runs the group, so a group re-run elsewhere sends the same requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from actors.agent.answer_agent import AnswerAgent, build_queries
from actors.agent.endpoint import RequestCounts
from actors.engines.base import SamplingSpec
from actors.engines.scheduler import Program
from actors.agent.episode import EpisodeRunner, Lane, score_oracle
from actors.agent.oracle import Oracle
from actors.agent.rewards import (
    MemoryScore,
    dialogue_tokens,
    final_questions,
    memory_score,
    questions_of_session,
    questions_up_to,
    scored_questions,
)
from common.config import Config
from common.types import QA, Conversation, GroupKind, Session, StepSample, samples_to_table
from memory_service.bank import MemoryBank

# Called before each session of each global rollout, with the rollout's index and lane: where the
# anchors' snapshots M_{t-1} are taken.
Keep = Callable[[Session, int, "Lane"], None]


@dataclass(slots=True)
class Group:
    kind: GroupKind
    group_id: str
    conversation: str
    session: int
    rewards: list[float]  # one per rollout / branch, in index order
    table: pa.Table
    policy_version: int
    scores: list[MemoryScore] = field(default_factory=list)

    def degenerate(self) -> bool:
        """All rewards equal: every advantage would be 0, so the group carries no signal."""
        return max(self.rewards) - min(self.rewards) < 1e-12


@dataclass(slots=True)
class LaneStats:
    lanes: int = 0
    steps: int = 0
    generated_tokens: int = 0
    format_failures: int = 0
    rejected_items: int = 0
    failed_ops: int = 0
    prompt_overflows: int = 0
    # The answer agent's endpoint, for this task's questions: requests re-sent after an error, and
    # requests that met at least one error (each answered in the end: a failed one stops the run).
    answer_retries: int = 0
    answer_failures: int = 0
    generate_s: float = 0.0
    score_s: float = 0.0

    def add(self, lanes: Sequence[Lane]) -> None:
        self.lanes += len(lanes)
        for lane in lanes:
            self.steps += len(lane.steps)
            self.generated_tokens += lane.generated_tokens()
            self.format_failures += lane.format_failures
            self.rejected_items += lane.rejected_items
            self.failed_ops += lane.failed_ops
            self.prompt_overflows += lane.prompt_overflows


@dataclass(slots=True, frozen=True)
class EvalResult:
    """A validation / `memr2 eval` rollout: its terminal memory's score and what generating it took."""

    score: MemoryScore
    stats: LaneStats


@dataclass(slots=True)
class GlobalResult:
    groups: list[Group]  # one per session t with questions
    stats: LaneStats
    final_scores: list[MemoryScore]  # rollout i's terminal memory on every scored question


@dataclass(slots=True)
class LocalResult:
    group: Group
    stats: LaneStats


class GroupCollector:
    """Runs groups with one engine and one answer agent (one of each per worker)."""

    def __init__(self, runner: EpisodeRunner, answer_agent: AnswerAgent, cfg: Config) -> None:
        self.runner, self.answer_agent, self.cfg = runner, answer_agent, cfg

    def spec(self) -> SamplingSpec:
        r = self.cfg.rollout
        return SamplingSpec(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)

    def run_global(self, conv: Conversation, horizon: int, n: int, key: str, keep: Keep | None = None) -> GlobalResult:
        """n full rollouts over sessions 1..T; `keep` sees every lane before each session."""
        horizon = min(horizon, len(conv.sessions))
        lanes = [Lane(MemoryBank.empty(self.cfg.memory.retriever)) for _ in range(n)]
        stats, start = LaneStats(), time.perf_counter()
        oracle = Oracle.of(conv)  # the gold side, once for every lane of the task
        self.runner.run([self._rollout(lane, i, conv, horizon, self.spec(), key, keep, oracle) for i, lane in enumerate(lanes)])
        stats.generate_s = time.perf_counter() - start

        start = time.perf_counter()
        score_oracle(lanes)
        stats.add(lanes)
        questions = final_questions(conv, horizon, self.cfg.data.exclude_adversarial)
        seen = dialogue_tokens(conv, horizon)
        predictions = [self._answer(conv, lane.bank, questions, stats) for lane in lanes]
        final = [memory_score(lane.bank, questions, p, seen, self.cfg.reward) for lane, p in zip(lanes, predictions)]
        groups = []
        for session in conv.sessions[:horizon]:
            t = session.index
            q_t = questions_of_session(questions, t)
            if not q_t:
                continue  # nothing became answerable in session t: no F1 signal for its steps
            picked = [i for i, q in enumerate(questions) if q in q_t]
            scores = [memory_score(lane.bank, q_t, [p[j] for j in picked], seen, self.cfg.reward) for lane, p in zip(lanes, predictions)]
            groups.append(self._group("global", f"{conv.sample_id}/s{t}", conv, t, lanes, scores))
        stats.score_s = time.perf_counter() - start
        return GlobalResult(groups, stats, final)

    def run_local(self, conv: Conversation, t: int, base: MemoryBank, anchor: int, m: int, key: str) -> LocalResult:
        """m branches of session t from the anchor's snapshot M_{t-1}, scored on the branched M_t."""
        lanes = [Lane(base.fork()) for _ in range(m)]
        session = next(s for s in conv.sessions if s.index == t)
        stats, start = LaneStats(), time.perf_counter()
        self.runner.run_session(lanes, conv, session, self.spec(), (key,), Oracle.of(conv))
        stats.generate_s = time.perf_counter() - start

        start = time.perf_counter()
        score_oracle(lanes)
        stats.add(lanes)
        position = conv.sessions.index(session) + 1
        questions = questions_up_to(scored_questions(conv, self.cfg.data.exclude_adversarial), t)
        seen = dialogue_tokens(conv, position)
        scores = [memory_score(lane.bank, questions, self._answer(conv, lane.bank, questions, stats), seen, self.cfg.reward) for lane in lanes]
        stats.score_s = time.perf_counter() - start
        return LocalResult(self._group("local", f"{conv.sample_id}/s{t}/anchor{anchor}", conv, t, lanes, scores), stats)

    def evaluate(self, conv: Conversation, horizon: int, key: str) -> EvalResult:
        """Validation: one rollout at the evaluation temperature, terminal memory on all questions."""
        horizon = min(horizon, len(conv.sessions))
        r = self.cfg.rollout
        spec = SamplingSpec(temperature=r.eval_temperature, top_p=1.0, max_new_tokens=r.max_new_tokens, seed=0)
        lane = Lane(MemoryBank.empty(self.cfg.memory.retriever))
        self.runner.run([self._rollout(lane, 0, conv, horizon, spec, key)])  # validation credits nothing: no oracle
        questions = final_questions(conv, horizon, self.cfg.data.exclude_adversarial)
        bank, stats = lane.bank, LaneStats()
        stats.add([lane])
        score = memory_score(bank, questions, self._answer(conv, bank, questions, stats), dialogue_tokens(conv, horizon), self.cfg.reward)
        return EvalResult(score, stats)

    def _rollout(self, lane: Lane, i: int, conv: Conversation, horizon: int, spec: SamplingSpec, key: str, keep: Keep | None = None,
                 oracle: Oracle | None = None) -> Program:
        """Rollout i over sessions 1..T, one program; `keep` sees its lane before each session."""
        for session in conv.sessions[:horizon]:
            if keep is not None:
                keep(session, i, lane)
            yield from self.runner.session(lane, i, conv, session, spec, (key, session.index), oracle)

    def _answer(self, conv: Conversation, bank: MemoryBank, questions: Sequence[QA], stats: LaneStats) -> list[str]:
        """The agent's answers; its endpoint's retries count in this task's stats (the agent is
        shared by every task on the worker, so the counts travel with the call, not the agent)."""
        if not questions:
            return []
        queries = build_queries(bank, [q.question for q in questions], [conv.speaker_a, conv.speaker_b], self.cfg.memory.answer_top_k)
        counts = RequestCounts()
        answers = self.answer_agent.answer(queries, counts)
        stats.answer_retries += counts.retries
        stats.answer_failures += counts.failures
        return answers

    def _group(self, kind: GroupKind, group_id: str, conv: Conversation, t: int, lanes: Sequence[Lane], scores: list[MemoryScore]) -> Group:
        version = self.runner.engine.policy_version
        samples = [
            StepSample(s.role, s.prompt_ids, s.response_ids, s.logprobs, conv.sample_id, t, group_id, kind, i, score.reward, 0.0, version,
                       s.chunk, s.oracle)
            for i, (lane, score) in enumerate(zip(lanes, scores, strict=True))
            for s in lane.steps
            if s.session == t
        ]
        return Group(kind, group_id, conv.sample_id, t, [s.reward for s in scores], samples_to_table(samples), version, scores)
