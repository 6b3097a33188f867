"""Multi-session episodes: per chunk, extractor -> retrieve related memories -> manager -> apply.

Each rollout (or local branch) is a *lane* and runs as a program (`EpisodeRunner.session`): a
generator that yields each generation it needs and gets the reply back. The worker's scheduler
(actors.engines.scheduler) puts the requests of every lane of every task it holds into one
continuous batch, so lanes never wait for each other; their CPU work (parsing, retrieval, chat
templating) runs on the scheduler's program thread while the engine steps. A lane owns its memory
bank (an immutable snapshot, so lanes never interfere) and records every generation as a step for
the learner. Prompts keep within `prompt_budget(cfg)`, the engine's context less the reply's
budget: a manager prompt over it shows fewer related memories, an extractor chunk over it is split,
and each is counted (`Lane.prompt_overflows`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from actors.engines.base import Engine, Request, SamplingSpec
from actors.engines.scheduler import Program, Scheduler
from actors.agent.oracle import Oracle
from actors.agent.parsing import parse_facts, parse_operations
from actors.agent.prompts import extractor_messages, manager_messages, prompt_budget, visible_memory_ids
from common.config import Config
from common.types import Conversation, Fact, MemoryItem, Role, Session, Turn
from memory_service.bank import MemoryBank


@dataclass(slots=True)
class StepRecord:
    role: Role
    session: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    # The extractor prompt's index within the session (a manager step: its extractor's). Prompt
    # splitting depends on the turns alone, so one index is one decision point in every lane.
    chunk: int = 0
    oracle: float = math.nan  # the step's quality against the gold (actors.agent.oracle); NaN without gold
    # What the oracle scores, kept until the lanes end (score_oracle): the oracle only measures, so
    # it stays off the program thread, whose time between engine steps the lanes' replies wait on
    # (actors.engines.scheduler).
    graded: tuple | None = None


@dataclass(slots=True)
class Lane:
    """One rollout (or one local branch): its memory and what its generations did."""

    bank: MemoryBank
    steps: list[StepRecord] = field(default_factory=list)
    format_failures: int = 0  # responses with no parsable JSON at all
    rejected_items: int = 0  # facts/operations dropped by validation (bad ids, fields, lengths)
    failed_ops: int = 0  # valid-looking operations the bank refused
    prompt_overflows: int = 0  # prompts over prompt_budget: manager k halved, extractor chunk halved

    def generated_tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.steps)


def score_oracle(lanes: Sequence[Lane]) -> None:
    """Every step's oracle score from what its lane kept for it, once the lanes have ended."""
    for lane in lanes:
        for step in lane.steps:
            if step.graded is not None:
                grade, turns, produced = step.graded
                step.oracle, step.graded = grade(turns, produced), None


def split_chunks(turns: Sequence[Turn], k: int) -> list[tuple[Turn, ...]]:
    """K contiguous chunks of near-equal size (fewer when a session has fewer than K turns)."""
    k = max(1, min(k, len(turns)))
    size, extra = divmod(len(turns), k)
    chunks, start = [], 0
    for i in range(k):
        end = start + size + (i < extra)
        chunks.append(tuple(turns[start:end]))
        start = end
    return [c for c in chunks if c]


def request_seed(*parts: object) -> int:
    """A stable per-request sampling seed, so a resumed run samples exactly what it would have."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _seeded(spec: SamplingSpec, *key: object) -> SamplingSpec:
    """A request's own seed, from where it stands in its task (never from the worker running it):
    lanes differ, reruns repeat."""
    return replace(spec, seed=request_seed(*key))


class EpisodeRunner:
    def __init__(self, engine: Engine, cfg: Config, scheduler: Scheduler | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.scheduler = scheduler or Scheduler(engine)

    def run(self, programs: Sequence[Program]) -> None:
        """Run lane programs to their end, in one continuous batch with whatever else the engine runs."""
        self.scheduler.run(programs)

    def run_session(self, lanes: Sequence[Lane], conv: Conversation, session: Session, spec: SamplingSpec, seed_key: tuple,
                    oracle: Oracle | None = None) -> None:
        """Every lane through one session (lane i seeded by `seed_key` and i); with `oracle`, the
        steps keep what score_oracle grades once the caller is done generating."""
        self.run([self.session(lane, i, conv, session, spec, seed_key, oracle) for i, lane in enumerate(lanes)])

    def session(self, lane: Lane, index: int, conv: Conversation, session: Session, spec: SamplingSpec, seed_key: tuple,
                oracle: Oracle | None = None) -> Program:
        """Lane `index` through one session: per chunk, the extractor, then (if it found facts) the
        manager. With `oracle` (the conversation's gold), every step keeps what score_oracle needs."""
        speakers = {conv.speaker_a, conv.speaker_b}
        prompt_index = 0  # the extractor prompt's index within the session: the steps' `chunk`
        for c, chunk in enumerate(split_chunks(session.turns, self.cfg.rollout.chunks_per_session)):
            parts = self._extractor_prompts(lane, session.date_time, chunk)
            for j, (prompt, turns) in enumerate(parts):
                key = (*seed_key, c if len(parts) == 1 else (c, j))  # a chunk that fits keeps its seeds
                chunk_ids = {t.dia_id for t in turns}
                gen = yield Request(prompt, _seeded(spec, *key, "extractor", index))
                step = StepRecord("extractor", session.index, prompt, gen.token_ids, gen.logprobs, prompt_index)
                facts = self._record(lane, step, parse_facts(gen.text, chunk_ids, speakers))
                if oracle is not None:
                    step.graded = (oracle.extractor, turns, facts)
                if facts:
                    prompt, related = self._manager_prompt(lane, facts)
                    gen = yield Request(prompt, _seeded(spec, *key, "manager", index))
                    step = StepRecord("manager", session.index, prompt, gen.token_ids, gen.logprobs, prompt_index)
                    ops = self._record(lane, step, parse_operations(gen.text, visible_memory_ids(related), speakers, chunk_ids))
                    lane.bank, errors = lane.bank.apply_all(ops, session.date_time)
                    lane.failed_ops += len(errors)
                    if oracle is not None:
                        step.graded = (oracle.manager, turns, lane.bank)  # the bank its operations made
                prompt_index += 1

    def _extractor_prompts(self, lane: Lane, date: str, turns: tuple[Turn, ...]) -> list[tuple[list[int], tuple[Turn, ...]]]:
        """The chunk's extractor prompt; over the budget, its halves' instead (down to one turn,
        sent as it is), so every turn is still read. Each prompt over the budget is counted."""
        system, user = extractor_messages(self.cfg.model.prompt_size, date, turns)
        prompt = self.engine.chat_prompt(system, user)
        over = len(prompt) > prompt_budget(self.cfg)
        lane.prompt_overflows += over
        if not over or len(turns) == 1:
            return [(prompt, turns)]
        half = len(turns) // 2
        return self._extractor_prompts(lane, date, turns[:half]) + self._extractor_prompts(lane, date, turns[half:])

    @staticmethod
    def _record(lane: Lane, step: StepRecord, parsed) -> list:
        lane.steps.append(step)
        lane.format_failures += parsed.format_failure
        lane.rejected_items += len(parsed.rejected)
        return parsed.items

    def _manager_prompt(self, lane: Lane, facts: list[Fact]) -> tuple[list[int], list[list[MemoryItem]]]:
        """Retrieve top-k related memories per fact; halve k until the prompt fits its budget."""
        budget = prompt_budget(self.cfg)
        k = self.cfg.memory.related_top_k
        while True:
            related = [lane.bank.retrieve(f.fact, k) for f in facts]
            system, user = manager_messages(self.cfg.model.prompt_size, facts, related)
            prompt = self.engine.chat_prompt(system, user)
            if len(prompt) <= budget or k == 0:
                return prompt, related
            lane.prompt_overflows += 1
            k //= 2
