"""Exact tests of episodes and groups with a scripted engine: known outputs -> known memory states,
rewards and group keys."""

import math
import re
from dataclasses import replace

import pytest

from actors.agent.answer_agent import ReaderAgent
from actors.engines.base import SamplingSpec
from actors.agent.episode import EpisodeRunner, Lane, request_seed, score_oracle, split_chunks
from actors.agent.groups import GroupCollector
from actors.agent.oracle import Oracle, soft_f1_texts
from actors.agent.prompts import context_tokens, prompt_budget, render_facts, render_operations
from actors.agent.rewards import compression, dialogue_tokens
from common.config import load_config
from common.types import QA, Conversation, Fact, GoldOperation, Operation, Session, Turn, table_to_samples
from memory_service.bank import MemoryBank
from tests.fakes import ScriptedEngine

DIA = re.compile(r"^(D\d+:\d+) (\w+): (.*)$", re.M)
FACT_LINE = re.compile(r"^(D\d+:\d+) (\w+) \[[^\]]*\]: (.*)$", re.M)


def conversation() -> Conversation:
    s1 = Session(1, "1:00 pm on 1 May, 2023", (
        Turn("Alice", "D1:1", "Hi Bob!"),
        Turn("Alice", "D1:2", "I live in Boston."),
        Turn("Bob", "D1:3", "I have a dog named Rex."),
        Turn("Bob", "D1:4", "Nice weather."),
    ))
    s2 = Session(2, "1:00 pm on 9 June, 2023", (
        Turn("Alice", "D2:1", "I moved to Denver."),
        Turn("Bob", "D2:2", "Cool."),
    ))
    qa = (
        QA("Where does Alice live?", "Denver", 4, ("D1:2", "D2:1"), "knowledge-update"),
        QA("What is the name of Bob's dog?", "Rex", 4, ("D1:3",), "single-hop"),
        QA("What car does Bob drive?", "", 5, ("D1:4",), "adversarial", "Volvo"),
    )
    return Conversation("c1", "Alice", "Bob", (s1, s2), qa)


def respond(system: str, user: str, lane: int) -> str:
    """Lane 0: every informative turn becomes a fact, inserted as a memory. Lane 1: the same facts,
    but the manager keeps nothing (NOOP). Lane 2: the manager answers with prose only."""
    if "Extract facts" in system:
        facts = [Fact(spk, dia, f"{spk}: {text}") for dia, spk, text in DIA.findall(user) if text not in ("Hi Bob!", "Nice weather.", "Cool.")]
        return render_facts(facts)
    if lane == 0:
        return render_operations([Operation("INSERT", speaker=spk, content=text, dia_id=dia) for dia, spk, text in FACT_LINE.findall(user)])
    return render_operations([Operation("NOOP")]) if lane == 1 else "Sure! I would store those."


@pytest.fixture
def cfg():
    return load_config(None, ["rollout.chunks_per_session=2", "rollout.n_global=3", "rollout.m_local=2", "model.prompt_size=compact"])


def test_split_chunks_is_contiguous_and_balanced():
    turns = tuple(Turn("A", f"D1:{i}", "x") for i in range(1, 8))
    assert [len(c) for c in split_chunks(turns, 3)] == [3, 2, 2]
    assert [len(c) for c in split_chunks(turns[:2], 6)] == [1, 1]
    assert sum(split_chunks(turns, 3), ()) == turns


def test_one_session_gives_known_memories_and_counts(cfg):
    engine = ScriptedEngine(respond)
    lanes = [Lane(MemoryBank.empty()) for _ in range(3)]
    EpisodeRunner(engine, cfg).run_session(lanes, conversation(), conversation().sessions[0], SamplingSpec(), ("k",))
    # 2 chunks x (extractor for 3 lanes + manager for 3 lanes): each lane's next request joins the
    # batch as soon as its last one finished, so every engine step holds all three lanes.
    assert engine.calls == [3, 3, 3, 3]
    # Every request has its own seed (task key, session, chunk, role, lane), the same on a rerun.
    assert len(set(engine.seeds)) == 12 and None not in engine.seeds
    again = ScriptedEngine(respond)
    EpisodeRunner(again, cfg).run_session([Lane(MemoryBank.empty()) for _ in range(3)], conversation(), conversation().sessions[0], SamplingSpec(), ("k",))
    assert again.seeds == engine.seeds
    assert [(m.speaker, m.content, m.dia_ids) for m in lanes[0].bank] == [
        ("Alice", "Alice: I live in Boston.", ("D1:2",)),
        ("Bob", "Bob: I have a dog named Rex.", ("D1:3",)),
    ]
    assert len(lanes[1].bank) == 0 and len(lanes[2].bank) == 0
    assert [lane.format_failures for lane in lanes] == [0, 0, 2]  # lane 2's two manager replies
    assert [len(lane.steps) for lane in lanes] == [4, 4, 4]
    assert [s.role for s in lanes[0].steps] == ["extractor", "manager", "extractor", "manager"]


def test_global_and_local_groups_have_known_keys_and_rewards(cfg):
    conv = conversation()
    collector = GroupCollector(EpisodeRunner(ScriptedEngine(respond), cfg), ReaderAgent(), cfg)
    snapshots = []  # (session, lane 0's bank before it)
    result = collector.run_global(conv, horizon=2, n=3, key="step0/global/c1",
                                  keep=lambda s, i, lane: snapshots.append((s.index, lane.bank)) if i == 0 else None)
    # Q_1 = {Rex} (latest evidence in session 1), Q_2 = {Alice's city}; category 5 is excluded.
    assert [g.group_id for g in result.groups] == ["c1/s1", "c1/s2"]
    assert all(g.kind == "global" for g in result.groups)
    seen = dialogue_tokens(conv, 2)
    lane0 = result.final_scores[0]
    # Lane 0 remembers "Bob: I have a dog named Rex." -> the reader answers "Rex": F1 1 on Q_1.
    # It inserted "Denver" without deleting "Boston"; the reader picks one of the two Alice memories.
    rex = result.groups[0]
    assert rex.rewards[0] == pytest.approx(1.0 - cfg.reward.lam * lane0.compression)
    assert rex.rewards[1] == rex.rewards[2] == 0.0  # empty memories: no answer, no compression
    # Word pieces: memories 7 + 9 + 7 ("Alice : I live in Boston ."...); dialogue 18 + 7.
    assert seen == 25 and lane0.compression == pytest.approx((7 + 9 + 7 - 0.7 * 25) / 25)
    samples = table_to_samples(rex.table)
    assert {(s.rollout, s.role) for s in samples} == {(i, r) for i in range(3) for r in ("extractor", "manager")}
    assert all(s.session == 1 and s.group_id == "c1/s1" and s.reward == rex.rewards[s.rollout] for s in samples)

    # Snapshots: before session 1 every lane is empty; before session 2 lane 0 holds two memories.
    assert [(t, len(bank)) for t, bank in snapshots] == [(1, 0), (2, 2)]
    local = collector.run_local(conv, 2, snapshots[1][1], anchor=0, m=2, key="step0/local/c1/s2/anchor0")
    group, stats = local.group, local.stats
    assert group.group_id == "c1/s2/anchor0" and group.kind == "local"
    # Both branches start from lane 0's two memories. Branch 0 inserts "Denver" (the reader may
    # still pick "Boston"), branch 1 keeps nothing new: F1 on {Rex, Alice's city} and compression differ.
    assert stats.lanes == 2 and len(group.rewards) == 2 and group.rewards[0] != group.rewards[1]
    assert not group.degenerate()
    assert [score.questions for score in group.scores] == [2, 2]
    # Per branch: extractor + manager for "I moved to Denver.", extractor only for "Cool." (no facts).
    assert [s.role for s in table_to_samples(group.table)] == ["extractor", "manager", "extractor"] * 2


def test_every_step_records_its_chunk_and_oracle_score(cfg):
    """Session 1 in two chunks (D1:1-2, D1:3-4); the gold: Alice's city at D1:2, Bob's dog at D1:3."""
    gold = (GoldOperation(1, "D1:2", "INSERT", "alice.city", "Alice", "Alice lives in Boston.", "Boston"),
            GoldOperation(1, "D1:3", "INSERT", "bob.pet", "Bob", "Bob has a dog named Rex.", "Rex"),
            GoldOperation(2, "D2:1", "UPDATE", "alice.city", "Alice", "Alice moved to Denver.", "Denver"))
    conv = replace(conversation(), gold_operations=gold)
    lanes = [Lane(MemoryBank.empty()) for _ in range(3)]
    EpisodeRunner(ScriptedEngine(respond), cfg).run_session(lanes, conv, conv.sessions[0], SamplingSpec(), ("k",), Oracle.of(conv))
    assert all(math.isnan(s.oracle) for lane in lanes for s in lane.steps)  # graded after generation, not during it
    score_oracle(lanes)
    boston = soft_f1_texts(["Alice: I live in Boston."], ["Alice lives in Boston."])
    rex = soft_f1_texts(["Bob: I have a dog named Rex."], ["Bob has a dog named Rex."])
    assert 0 < rex < boston < 1  # the extracted wording is close to the gold's, not equal
    for lane in lanes:
        assert [(s.role, s.chunk) for s in lane.steps] == [("extractor", 0), ("manager", 0), ("extractor", 1), ("manager", 1)]
        assert [s.oracle for s in lane.steps if s.role == "extractor"] == [boston, rex]  # every lane extracts alike
    # Lane 0 stores every fact: its bank against the gold bank after D1:2, then after D1:4.
    assert [s.oracle for s in lanes[0].steps if s.role == "manager"] == [
        boston, soft_f1_texts(["Alice: I live in Boston.", "Bob: I have a dog named Rex."], ["Alice lives in Boston.", "Bob has a dog named Rex."])]
    # Lanes 1 (NOOP) and 2 (prose) keep nothing while the gold bank fills.
    assert [s.oracle for lane in lanes[1:] for s in lane.steps if s.role == "manager"] == [0.0] * 4

    # Into the group's table, next to the advantage; a conversation without gold has NaN there.
    collector = GroupCollector(EpisodeRunner(ScriptedEngine(respond), cfg), ReaderAgent(), cfg)
    samples = table_to_samples(collector.run_global(conv, horizon=1, n=3, key="g").groups[0].table)
    assert [(s.rollout, s.chunk, s.oracle) for s in samples] == [(i, st.chunk, st.oracle) for i, lane in enumerate(lanes) for st in lane.steps]
    plain = table_to_samples(collector.run_global(conversation(), horizon=1, n=3, key="g").groups[0].table)
    assert [s.chunk for s in plain] == [s.chunk for s in samples] and all(math.isnan(s.oracle) for s in plain)


def test_compression_penalty_formula():
    bank = MemoryBank.empty().apply(Operation("INSERT", speaker="A", content="one two three four five six seven eight nine ten"))
    assert compression(bank, 10, 0.7) == pytest.approx((10 - 7) / 10)
    assert compression(bank, 100, 0.7) == 0.0
    assert compression(bank, 0, 0.7) == 0.0


def test_evaluation_counts_its_format_failures_and_generated_tokens(cfg):
    """Validation and `memr2 eval` report what the rollout took, as training steps do."""
    def prose_manager(system: str, user: str, lane: int) -> str:
        return respond(system, user, 0) if "Extract facts" in system else "Sure! I would store those."

    engine = ScriptedEngine(prose_manager)
    result = GroupCollector(EpisodeRunner(engine, cfg), ReaderAgent(), cfg).evaluate(conversation(), 2, "val/c1")
    # Managers run for the chunks with facts: two in session 1, "I moved to Denver." in session 2.
    roles = [("manager" if "Extract facts" not in system else "extractor") for system, _ in engine.texts]
    assert roles.count("manager") == 3 and result.stats.format_failures == 3 and result.stats.lanes == 1
    assert result.stats.steps == len(engine.texts) == 7
    assert result.stats.generated_tokens == sum(len(prose_manager(s, u, 0).split()) for s, u in engine.texts)
    assert result.score.memory_tokens == 0 and result.score.questions == 2  # nothing stored; category 5 left out


class Measured(ScriptedEngine):
    """A scripted engine whose prompts have as many tokens as their text has words; it keeps the
    requests sent."""

    def __init__(self, respond) -> None:
        super().__init__(respond)
        self.sent = []

    def chat_prompt(self, system: str, user: str) -> list[int]:
        return super().chat_prompt(system, user) * len(f"{system} {user}".split())

    def add_request(self, request_id, request) -> None:
        self.sent.append(request)
        super().add_request(request_id, request)


def budget_cfg(max_prompt: int, max_new: int, *more: str):
    return load_config(None, [f"model.max_prompt_tokens={max_prompt}", f"rollout.max_new_tokens={max_new}",
                              "model.prompt_size=minimal", *more])


def test_a_manager_prompt_that_fits_the_context_with_its_reply_keeps_every_related_memory():
    facts = [Fact("Alice", "D2:1", "Alice lives in Boston now.")]
    bank = MemoryBank.empty()
    for i in range(6):
        bank = bank.apply(Operation("INSERT", speaker="Alice", content=f"Alice lives in Boston near the harbour, note {i}."))

    def manager_prompt(max_prompt: int, max_new: int):
        cfg, lane = budget_cfg(max_prompt, max_new, "memory.related_top_k=6"), Lane(bank)
        prompt, related = EpisodeRunner(Measured(respond), cfg)._manager_prompt(lane, facts)
        return len(prompt), len(related[0]), lane.prompt_overflows

    full, k, _ = manager_prompt(4096, 64)
    assert k == 6 and full > 64
    # The engine's context is max_prompt_tokens + max_new_tokens: a prompt of max_prompt_tokens
    # leaves the whole reply's budget. The old cap (max_prompt_tokens - max_new_tokens) cut it to k = 3.
    cfg = budget_cfg(full, 64)
    assert prompt_budget(cfg) == full and full + 64 == context_tokens(cfg)
    assert manager_prompt(full, 64) == (full, 6, 0)
    assert manager_prompt(full, 8) == (full, 6, 0)  # the reply's budget does not shrink the prompt's
    shorter, k, overflows = manager_prompt(full - 1, 64)
    assert k == 3 and overflows == 1 and shorter < full


def test_an_extractor_chunk_over_the_budget_is_split_and_counted_and_every_turn_is_read():
    turns = tuple(Turn("Alice", f"D1:{i}", f"turn {i} " + "and so on " * 6) for i in range(1, 6))
    conv = Conversation("c1", "Alice", "Bob", (Session(1, "1:00 pm on 1 May, 2023", turns),), ())

    def extract(max_prompt: int):
        engine, lane = Measured(lambda system, user, i: '{"facts":[]}'), Lane(MemoryBank.empty())
        cfg = budget_cfg(max_prompt, 16, "rollout.chunks_per_session=1")
        EpisodeRunner(engine, cfg).run_session([lane], conv, conv.sessions[0], SamplingSpec(), ("k",))
        read = [DIA.findall(engine.texts[r.prompt[0]][1]) for r in engine.sent]
        return engine, lane, read

    engine, lane, read = extract(4096)
    assert len(read) == 1 and lane.prompt_overflows == 0
    assert engine.seeds == [request_seed("k", 0, "extractor", 0)]  # a chunk that fits keeps its seed
    engine, lane, read = extract(80)  # one turn's prompt is ~40 words, the chunk's ~130
    assert len(read) > 2 and all(len(r.prompt) <= 80 for r in engine.sent)
    assert [dia for part in read for dia, _, _ in part] == [t.dia_id for t in turns]  # each turn once, in order
    assert lane.prompt_overflows == len(read) - 1  # one per split
    assert [step.chunk for step in lane.steps] == list(range(len(read)))  # each prompt its own decision point
    assert len(set(engine.seeds)) == len(read)
