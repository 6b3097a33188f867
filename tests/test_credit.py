"""Credit fidelity: oracle scores of single steps against a hand-made gold world, Spearman per cell and
group on a hand-made step table, the training row's credit metrics, and `memr2 bench credit` end to end."""

import json
import math
from pathlib import Path

import pyarrow.compute as pc
import pytest

from actors.agent.oracle import Oracle, soft_f1_texts
from common.scoring import bootstrap_ci
from common.types import Conversation, Fact, GoldOperation, Operation, Session, StepSample, Turn, samples_to_table
from learner import train
from learner.bench_credit import CONVERSATIONS, conversations_per_horizon, parse_horizons, richest
from learner.credit import GroupCredit, group_credit, paired_difference, step_metrics, summarize, values_by_kind
from memory_service.bank import MemoryBank

BOSTON, REX = "Alice lives in Boston.", "Bob has a dog named Rex."
DENVER, REX_DIED = "Alice moved to Denver on 9 June, 2023.", "Bob's dog Rex died on 9 June, 2023."


def gold_conversation() -> Conversation:
    s1 = Session(1, "1:00 pm on 1 May, 2023", (
        Turn("Alice", "D1:1", "Hi Bob!"),
        Turn("Alice", "D1:2", "I live in Boston."),
        Turn("Bob", "D1:3", "I have a dog named Rex."),
    ))
    s2 = Session(2, "1:00 pm on 9 June, 2023", (
        Turn("Alice", "D2:1", "I moved to Denver."),
        Turn("Bob", "D2:2", "Sadly Rex died."),
    ))
    ops = (
        GoldOperation(1, "D1:2", "INSERT", "alice.city", "Alice", BOSTON, "Boston"),
        GoldOperation(1, "D1:3", "INSERT", "bob.pet", "Bob", REX, "Rex"),
        GoldOperation(2, "D2:1", "UPDATE", "alice.city", "Alice", DENVER, "Denver"),
        GoldOperation(2, "D2:2", "DELETE", "bob.pet", "Bob", REX_DIED),
    )
    return Conversation("g1", "Alice", "Bob", (s1, s2), (), gold_operations=ops)


def facts(*texts: str) -> list[Fact]:
    return [Fact("Alice", "D1:2", t) for t in texts]


def bank(*contents: str) -> MemoryBank:
    b = MemoryBank.empty()
    for c in contents:
        b = b.apply(Operation("INSERT", speaker="Alice", content=c))
    return b


@pytest.fixture
def oracle() -> Oracle:
    return Oracle.of(gold_conversation())


def test_no_gold_operations_no_oracle():
    conv = gold_conversation()
    assert Oracle.of(Conversation(conv.sample_id, "Alice", "Bob", conv.sessions, ())) is None


def test_extractor_oracle_perfect_partial_empty_and_hallucinated(oracle):
    s1 = gold_conversation().sessions[0].turns
    assert oracle.extractor(s1, facts(BOSTON, REX)) == 1.0
    # Half the gold: precision 1, recall (1 + 0) / 2 (no token of one fact is in the other) -> 2/3.
    assert oracle.extractor(s1, facts(BOSTON)) == pytest.approx(2 / 3)
    # Token overlap counts: "alice live in denver" against "alice live in boston" is F1 3/4 both ways.
    assert oracle.extractor(s1[1:2], facts("Alice lives in Denver.")) == pytest.approx(0.75)
    assert oracle.extractor(s1, []) == 0.0  # gold to extract, nothing extracted
    assert oracle.extractor(s1[:1], []) == 1.0  # a greeting: nothing to extract, nothing extracted
    assert oracle.extractor(s1[:1], facts("Alice owns a red Tesla.")) == 0.0  # made up from nothing
    # A made-up fact beside both gold ones: precision (1 + 1 + 0) / 3, recall 1 -> 0.8.
    assert oracle.extractor(s1, facts(BOSTON, REX, "Carol sings opera loudly.")) == pytest.approx(0.8)
    # Only the turns read count: the same two facts against D1:2 alone find one of them extra.
    assert oracle.extractor(s1[:2], facts(BOSTON, REX)) == pytest.approx(2 * (1 / 2) / (1 / 2 + 1))


def test_manager_oracle_replays_the_gold_bank_up_to_the_last_turn_read(oracle):
    s1, s2 = (s.turns for s in gold_conversation().sessions)
    assert oracle.manager(s1, bank(BOSTON, REX)) == 1.0
    assert oracle.manager(s1[:2], bank(BOSTON)) == 1.0  # after D1:2 the gold bank holds Boston only
    assert oracle.manager(s1[:1], bank()) == 1.0  # nothing yet, nothing kept
    assert oracle.manager(s1, bank(BOSTON)) == pytest.approx(2 / 3)  # one of two gold memories
    assert oracle.manager(s1, bank()) == 0.0
    # After D2:1 the UPDATE has rewritten Alice's city; Rex is still there.
    assert oracle.manager(s2[:1], bank(DENVER, REX)) == 1.0
    # After D2:2 Rex is deleted: gold is {DENVER}. A bank that never updated or deleted: Boston
    # against Denver shares "alice" only (P 1/4, R 1/8: F1 1/6), Rex nothing; precision
    # (1/6 + 0) / 2 = 1/12, recall 1/6 -> soft F1 1/9.
    assert oracle.manager(s2, bank(BOSTON, REX)) == pytest.approx(1 / 9)
    assert oracle.manager(s2, bank(DENVER)) == 1.0


def test_soft_f1_is_symmetric_in_its_definition_of_both_sides():
    assert soft_f1_texts([], []) == 1.0 and soft_f1_texts(["x y"], []) == 0.0 and soft_f1_texts([], ["x y"]) == 0.0
    assert soft_f1_texts(["the"], ["the"]) == 0.0  # LoCoMo's F1: nothing left after normalising scores 0
    assert soft_f1_texts(["a b", "c d"], ["a b"]) == soft_f1_texts(["a b"], ["a b", "c d"]) == pytest.approx(2 / 3)


def row(group: str, kind: str, rollout: int, chunk: int, role: str, adv: float, oracle: float) -> StepSample:
    session = int(group.split("/s")[1][0])
    return StepSample(role, [1], [2], [-0.5], "c", session, group, kind, rollout, 0.0, adv, 0, chunk, oracle)


def hand_table():
    g, a0, a1, a2 = "c/s1", "c/s2/anchor0", "c/s2/anchor1", "c/s1/anchor2"
    rows = [
        # Global c/s1. Cell (chunk 0, extractor): oracle ranks 1 2 4 3 against 1 2 3 4: rho = 1 - 6*2/(4*15) = 0.8.
        *(row(g, "global", i, 0, "extractor", a, o) for i, (a, o) in enumerate(zip([-1.5, -0.5, 0.5, 1.5], [0.1, 0.2, 0.4, 0.3]))),
        # (chunk 0, manager): two samples, skipped.
        row(g, "global", 0, 0, "manager", -1.5, 0.1), row(g, "global", 3, 0, "manager", 1.5, 0.9),
        # (chunk 1, extractor): a constant oracle, skipped.
        *(row(g, "global", i, 1, "extractor", a, 0.5) for i, a in enumerate([-1.5, -0.5, 0.5, 1.5])),
        # (chunk 1, manager): a sample without an oracle is left out; the other three rank reversed: -1.
        row(g, "global", 0, 1, "manager", -1.5, 0.9), row(g, "global", 2, 1, "manager", 0.5, 0.5),
        row(g, "global", 3, 1, "manager", 1.5, 0.1), row(g, "global", 1, 1, "manager", -0.5, math.nan),
        # Local anchor0: one cell, ranked the same: +1.
        *(row(a0, "local", i, 0, "extractor", a, o) for i, (a, o) in enumerate(zip([-1.2, 0.0, 1.2], [0.2, 0.4, 0.6]))),
        # Local anchor1: ties in the advantage (average ranks 1.5 1.5 3.5 3.5 against 1 3 2 4): 2 / sqrt(4 * 5).
        *(row(a1, "local", i, 0, "manager", a, o) for i, (a, o) in enumerate(zip([-1.0, -1.0, 1.0, 1.0], [0.1, 0.3, 0.2, 0.4]))),
        # Local anchor2: its only cell has a constant advantage: no defined cell, the group is not counted.
        *(row(a2, "local", i, 0, "extractor", 0.7, o) for i, o in enumerate([0.1, 0.5, 0.9])),
    ]
    return samples_to_table(rows)


def test_spearman_per_cell_and_group_on_a_hand_made_table():
    credit = {g.group_id: g for g in group_credit(hand_table())}
    assert list(credit) == ["c/s1", "c/s2/anchor0", "c/s2/anchor1", "c/s1/anchor2"]
    assert credit["c/s1"].value == pytest.approx((0.8 - 1.0) / 2) and credit["c/s1"].cells == 2
    assert credit["c/s2/anchor0"].value == pytest.approx(1.0) and credit["c/s2/anchor0"].cells == 1
    assert credit["c/s2/anchor1"].value == pytest.approx(1 / math.sqrt(5))
    assert credit["c/s1/anchor2"].value is None and credit["c/s1/anchor2"].cells == 0
    values = values_by_kind(credit.values())
    assert values == {"global": [pytest.approx(-0.1)], "local": [pytest.approx(1.0), pytest.approx(1 / math.sqrt(5))]}
    summary = summarize(values)
    assert summary["global"] == {"corr_mean": pytest.approx(-0.1), "ci": [pytest.approx(-0.1), pytest.approx(-0.1)], "groups": 1}
    local = summary["local"]
    assert local["groups"] == 2 and local["corr_mean"] == pytest.approx((1 + 1 / math.sqrt(5)) / 2)
    assert local["ci"] == list(bootstrap_ci(values["local"])) and local["ci"][0] < local["corr_mean"] < local["ci"][1]
    assert summarize({"global": [], "local": []})["local"] == {"corr_mean": None, "ci": None, "groups": 0}


def test_local_minus_global_pairs_the_groups_that_credit_the_same_session():
    assert [g.where for g in group_credit(hand_table())] == [("c", 1), ("c", 2), ("c", 2), ("c", 1)]
    assert paired_difference(group_credit(hand_table())) == {"mean": None, "ci": None, "pairs": 0}  # no session has both

    def g(kind, conv, session, value):
        return GroupCredit(f"{conv}/s{session}/{kind}{value}", kind, value, 1 if value is not None else 0, (conv, session))

    groups = [g("global", "a", 1, 0.1), g("local", "a", 1, 0.5), g("local", "a", 1, 0.3),  # two anchors: averaged, +0.3
              g("global", "a", 2, 0.4), g("local", "a", 2, 0.2),  # -0.2
              g("global", "b", 1, 0.0), g("local", "b", 1, None),  # the local group did not count: no pair
              g("local", "b", 2, 0.9)]  # no global group for (b, 2): no pair
    d = paired_difference(groups)
    assert d["pairs"] == 2 and d["mean"] == pytest.approx(0.05) and d["ci"] == pytest.approx(list(bootstrap_ci([0.3, -0.2])))


def test_a_training_step_row_carries_credit_only_where_defined():
    table = hand_table()
    assert step_metrics(table) == {"credit_corr_global": pytest.approx(-0.1),
                                   "credit_corr_local": pytest.approx((1 + 1 / math.sqrt(5)) / 2)}
    assert step_metrics(table.filter(pc.equal(table["group_id"], "c/s1/anchor2"))) == {}  # absent, never NaN


class _Batch:
    groups, wall_s, validation = [], 1.0, []

    def summary(self):
        return {"reward_mean": 0.5}


class _Learner:
    """What train_step asks of the learner; prepare returns the hand-made rows with their advantages."""

    def admit(self, tables, staleness):
        return [hand_table()]

    def prepare(self, tables):
        return hand_table()

    def update(self, rows):
        return {"loss": 0.25}

    reload_states = offload_states = lambda self: 0.0
    take_stale_groups = take_restarts = lambda self: 0


class _Fleet:
    sleep = lambda self: 0.0  # noqa: E731
    wake = lambda self, tags: 0.0  # noqa: E731
    live = lambda self: []  # noqa: E731
    take_faults = lambda self: {}  # noqa: E731


class _Ahead:
    max_staleness = 0
    take = lambda self, plan: _Batch()  # noqa: E731
    start = lambda self, plan: None  # noqa: E731
    wait = lambda self: 0.0  # noqa: E731


def test_train_step_writes_the_credit_of_the_rows_it_trains_on(monkeypatch):
    monkeypatch.setattr(train, "sync_weights", lambda learner, fleet: 0.0)
    out = train.train_step(_Fleet(), _Learner(), _Ahead(), None, None)
    assert out["loss"] == 0.25 and out["credit_corr_global"] == pytest.approx(-0.1)
    assert out["credit_corr_local"] == pytest.approx((1 + 1 / math.sqrt(5)) / 2)


def test_bench_credit_arguments():
    assert parse_horizons("8,2,4") == [2, 4, 8]
    for bad in ("", "2,x", "0,2", "2,2"):
        with pytest.raises(ValueError, match="--horizons takes distinct positive integers"):
            parse_horizons(bad)
    assert conversations_per_horizon([2, 4, 8], None) == CONVERSATIONS
    assert conversations_per_horizon([1, 16], None) == {1: 100, 16: 2}  # ceil(100 / H^1.5) beyond the measured ones
    assert conversations_per_horizon([2, 8], 5) == {2: 5, 8: 5}
    with pytest.raises(ValueError, match="--conversations must be at least 1"):
        conversations_per_horizon([2], 0)


def test_each_horizon_measures_on_the_conversations_with_most_to_ask_by_then():
    from actors.agent.rewards import final_questions
    from common.config import DataConfig, SynthConfig
    from common.data import load_dataset

    world = load_dataset(DataConfig(source="synthetic", synth=SynthConfig(conversations=60, sessions=8, val_conversations=0)))
    for horizon in (2, 8):
        asked = {c.sample_id: len(final_questions(c, horizon, True)) for c in world}
        chosen = richest(world, horizon, 10, True)
        assert len({c.sample_id for c in chosen}) == 10
        # Nothing left out asks more than anything chosen, and the chosen are ordered richest first.
        assert min(asked[c.sample_id] for c in chosen) >= max(n for cid, n in asked.items() if cid not in {c.sample_id for c in chosen})
        assert [asked[c.sample_id] for c in chosen] == sorted((asked[c.sample_id] for c in chosen), reverse=True)
    early = richest(world, 2, 10, True)
    assert sum(len(final_questions(c, 2, True)) for c in early) >= 2 * sum(len(final_questions(c, 2, True)) for c in world[:10])
    assert [c.sample_id for c in richest(world, 2, 60, True)][:1] == [early[0].sample_id] and len(richest(world, 2, 99, True)) == 60


@pytest.mark.slow
def test_bench_credit_on_the_tiny_world_reports_both_kinds_per_horizon_and_plots(tmp_path, warm_tiny):
    """`memr2 bench credit` on the memorised tiny policy: one conversation of two sessions, horizons 1 and 2."""
    from tests.tiny_world import WORLD, finish, memr2

    out = finish(memr2("bench", "credit", "--horizons", "2,1", "--conversations", "1", "--json", *WORLD, f"model.name={warm_tiny}",
                       "train.warmstart.enabled=false", "rollout.temperature=1.0", "rollout.max_new_tokens=192",
                       "rollout.num_actors=1", "metrics.prometheus=false", f"metrics.run_dir={tmp_path}"))
    result = json.loads(out.strip().splitlines()[-1])
    assert list(result["horizons"]) == ["1", "2"] and result["conversations"] == {"1": 1, "2": 1}
    assert (result["sessions"], result["n_global"], result["m_local"], result["local_prob"]) == (2, 8, 8, 1.0)
    per_group = json.loads((Path(result["out"]) / "credit.json").read_text())["per_group"]
    counted = 0
    for h, row in result["horizons"].items():
        # One conversation: a global group per session with questions, a local group per session.
        assert row["global_groups"] <= int(h) and row["local_groups"] == int(h)
        for kind in ("global", "local"):
            stats, groups = row[kind], per_group[h][kind]
            values = [g["value"] for g in groups if g["value"] is not None]
            assert stats["groups"] == len(values) and stats["with_signal"] == len(groups)
            assert stats["cells"] == sum(g["cells"] for g in groups) and all((g["value"] is None) == (g["cells"] == 0) for g in groups)
            if values:
                assert stats["corr_mean"] == pytest.approx(sum(values) / len(values)) and all(-1 <= v <= 1 for v in values)
                assert stats["ci"][0] <= stats["corr_mean"] <= stats["ci"][1]
            else:
                assert stats["corr_mean"] is None and stats["ci"] is None
            counted += len(values)
        pairs = row["local_minus_global"]
        assert pairs["pairs"] <= min(row["global"]["groups"], row["local"]["groups"]) and (pairs["mean"] is None) == (pairs["pairs"] == 0)
    assert counted > 0  # oracle scores came through the real engine's rollouts into the groups
    plot = Path(result["plot"])
    assert plot.parent == Path(result["out"]) and plot.name == "credit.png" and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,line", [
    (["--horizons", "2,x"], "--horizons takes distinct positive integers separated by commas, e.g. 2,4,8; got '2,x'"),
    (["--horizons", "2,4", "data.synth.sessions=3"], "horizon 4 needs a synthetic world of at least 4 sessions "
                                                     "(data.source=synthetic, data.synth.sessions=3)"),
    (["--horizons", "2", "data.source=locomo"], "horizon 2 needs a synthetic world of at least 2 sessions "
                                                "(data.source=locomo, data.synth.sessions=8)"),
    (["--horizons", "2", "--conversations", "3", "data.synth.conversations=3", "data.synth.val_conversations=1"],
     "3 conversations needed, the world trains on 2 (raise data.synth.conversations or lower data.synth.val_conversations)"),
])
def test_bench_credit_refuses_a_world_it_cannot_measure_in_one_line_before_anything_starts(args, line, capsys):
    from memr2.cli import main

    assert main(["bench", "credit", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"memr2: error: bench credit: {line}"]
