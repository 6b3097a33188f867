"""Invariants of the seeded synthetic multi-session world (common.synth)."""
from __future__ import annotations

import datetime as dt
import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.synth import generate_world, write_world

KINDS = {"single-hop": 4, "knowledge-update": 4, "temporal": 2, "multi-hop": 1,
         "deleted": 4, "adversarial": 5}
SESSION_FMT = "%I:%M %p on %d %B, %Y"
DATE_RE = re.compile(r"^\d{1,2} [A-Z][a-z]+, \d{4}$")
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def sessions_of(conv: dict) -> list[int]:
    return sorted(int(k.split("_")[1]) for k in conv["conversation"]
                  if re.fullmatch(r"session_\d+", k))


def turns_by_id(conv: dict) -> dict[str, dict]:
    c = conv["conversation"]
    return {t["dia_id"]: t for s in sessions_of(conv) for t in c[f"session_{s}"]}


def session_time(conv: dict, s: int) -> dt.datetime:
    return dt.datetime.strptime(conv["conversation"][f"session_{s}_date_time"], SESSION_FMT)


def replay(ops: list[dict]) -> tuple[dict[str, str], dict[str, dict]]:
    """Apply gold operations in order; also return the state just before each op."""
    state: dict[str, str] = {}
    before: dict[str, dict] = {}
    for op in ops:
        before[op["dia_id"]] = dict(state)
        if op["op"] == "INSERT":
            assert op["key"] not in state, f"INSERT of existing key {op}"
            state[op["key"]] = op["value"]
        elif op["op"] == "UPDATE":
            assert op["key"] in state and state[op["key"]] != op["value"], op
            state[op["key"]] = op["value"]
        else:
            assert op["op"] == "DELETE" and op["key"] in state, op
            assert "value" not in op
            del state[op["key"]]
    return state, before


def resolve(phrase_text: str, today: dt.date) -> dt.date | None:
    """Resolve the relative date phrase a turn uses, as an ideal fact extractor would."""
    fixed = {"today": 0, "yesterday": 1, "two days ago": 2, "three days ago": 3}
    for phrase, back in fixed.items():
        if re.search(rf"\b{phrase}\b", phrase_text):
            return today - dt.timedelta(days=back)
    m = re.search(r"\bon (\d{1,2}) ([A-Z][a-z]+)\b", phrase_text)
    if m:
        d = dt.date(today.year, MONTHS.index(m.group(2)) + 1, int(m.group(1)))
        return d if d <= today else d.replace(year=today.year - 1)
    m = re.search(r"\bon (" + "|".join(WEEKDAYS) + r")\b", phrase_text)
    if m:
        back = (today.weekday() - WEEKDAYS.index(m.group(1))) % 7 or 7
        return today - dt.timedelta(days=back)
    return None


def check_conversation(conv: dict, sessions: int, turns: int) -> None:
    c = conv["conversation"]
    a, b = c["speaker_a"], c["speaker_b"]
    assert a != b
    assert sessions_of(conv) == list(range(1, sessions + 1))
    times = [session_time(conv, s) for s in range(1, sessions + 1)]
    assert all(t1 < t2 for t1, t2 in zip(times, times[1:])), "session dates must increase"
    for s in range(1, sessions + 1):
        ids = [t["dia_id"] for t in c[f"session_{s}"]]
        assert ids == [f"D{s}:{j}" for j in range(1, turns + 1)]
        assert all(t["speaker"] in (a, b) and t["text"].strip() for t in c[f"session_{s}"])
    by_id = turns_by_id(conv)
    ops, facts = conv["gold"]["operations"], conv["gold"]["facts"]
    state, before = replay(ops)

    # Gold facts: one short, named fact per fact-bearing turn, exactly the turns with an op.
    assert list(facts) == [op["dia_id"] for op in ops]
    assert len(set(facts)) == len(facts)
    values = set()
    for op in ops:
        turn = by_id[op["dia_id"]]
        assert op["session"] == int(op["dia_id"][1:].split(":")[0])
        assert turn["speaker"] == op["speaker"]
        assert op["key"].startswith(re.sub(r"\W", "_", op["speaker"].lower()) + ".")
        [fact] = facts[op["dia_id"]]
        assert fact == op["content"] and op["speaker"] in fact and len(fact.split()) <= 20
        said = op["value"] if op["op"] != "DELETE" else before[op["dia_id"]][op["key"]]
        assert said in turn["text"], (said, turn)
        values.add(said)
        if op["key"].count(".") == 2:  # pets / hobbies: the item itself must be said too
            item = op["key"].split(".")[2].replace("_", " ")
            assert item in turn["text"].lower()
        when = resolve(turn["text"], session_time(conv, op["session"]).date())
        if when is not None:  # relative dates become absolute in the gold fact
            assert f"{when.day} {MONTHS[when.month - 1]}, {when.year}" in fact, (turn, fact)
            if op["session"] > 1:
                assert when > session_time(conv, op["session"] - 1).date()
    # Small talk carries no facts: no slot value appears outside fact-bearing turns.
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(values))) + r")\b")
    for dia_id, turn in by_id.items():
        if dia_id not in facts and values:
            assert not pattern.search(turn["text"]), turn

    op_at = {op["dia_id"]: op for op in ops}
    for q in conv["qa"]:
        assert KINDS[q["kind"]] == q["category"], q
        assert q["question"].endswith("?") and q["evidence"]
        assert all(e in by_id for e in q["evidence"]), q
        assert all(e in op_at for e in q["evidence"]), "evidence lies on fact-bearing turns"
        if q["category"] == 5:
            assert "answer" not in q and q["adversarial_answer"], q
            continue
        assert "adversarial_answer" not in q and isinstance(q["answer"], str) and q["answer"]
        last = op_at[q["evidence"][-1]]
        if q["kind"] in ("knowledge-update", "single-hop") and last["key"].count(".") == 1:
            assert state[last["key"]] == q["answer"], (q, last)
            key_ops = [o for o in ops if o["key"] == last["key"]]
            assert key_ops[-1]["dia_id"] in q["evidence"], "latest value's turn is evidence"
            n_values = len({o["value"] for o in key_ops if o["op"] != "DELETE"})
            assert (n_values >= 2) == (q["kind"] == "knowledge-update"), q
        if q["kind"] == "deleted":
            assert last["op"] == "DELETE" and q["answer"] == "No"
            assert state.get(last["key"]) != before[last["dia_id"]][last["key"]]
        if q["kind"] == "temporal":
            assert DATE_RE.match(q["answer"]) and q["answer"] in last["content"], q
            assert last["key"] in state and last["dia_id"] in {o["dia_id"] for o in ops
                                                                if o["key"] == last["key"]}
        if q["kind"] == "multi-hop":
            assert len(q["answer"].split(",")) == len(q["evidence"]) >= 2, q


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), sessions=st.integers(1, 10),
       conversations=st.integers(1, 3), turns=st.integers(2, 14), data=st.data())
def test_invariants(seed, sessions, conversations, turns, data):
    facts = data.draw(st.integers(1, min(5, turns - 1)), label="facts_per_session")
    world = generate_world(conversations, sessions, seed, turns_per_session=turns,
                           facts_per_session=facts)
    assert [c["sample_id"] for c in world] == [f"synth-{seed}-{i}" for i in range(conversations)]
    for conv in world:
        check_conversation(conv, sessions, turns)
    qa = [q for c in world for q in c["qa"]]
    if sessions >= 4:
        ku = sum(q["kind"] == "knowledge-update" for q in qa)
        assert ku >= 1 and ku / len(qa) >= 0.2, (ku, len(qa))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(-10**9, 10**9), sessions=st.integers(4, 40))
def test_knowledge_update_share_default_sizes(seed, sessions):
    qa = [q for c in generate_world(2, sessions, seed) for q in c["qa"]]
    ku = sum(q["kind"] == "knowledge-update" for q in qa)
    assert ku / len(qa) >= 0.2


def test_full_size_world_is_fast_and_mixed():
    start = time.perf_counter()
    world = generate_world(4, 32, 7)
    assert time.perf_counter() - start < 1.0
    for conv in world:
        check_conversation(conv, 32, 10)
    kinds = {q["kind"] for c in world for q in c["qa"]}
    assert kinds == set(KINDS)
    ops = {o["op"] for c in world for o in c["gold"]["operations"]}
    assert ops == {"INSERT", "UPDATE", "DELETE"}
    assert all(len(c["gold"]["operations"]) == 32 * 3 for c in world)


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    p1, p2, p3 = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    w1 = write_world(p1, conversations=2, sessions=6, seed=11)
    write_world(p2, conversations=2, sessions=6, seed=11)
    write_world(p3, conversations=2, sessions=6, seed=12)
    assert p1.read_bytes() == p2.read_bytes()
    assert p1.read_bytes() != p3.read_bytes()
    assert json.loads(p1.read_text()) == w1 == generate_world(2, 6, 11)


@pytest.mark.parametrize("seed", [0, 7, 123456])
def test_conversation_independent_of_world_size(seed):
    big = generate_world(4, 6, seed)
    assert generate_world(1, 6, seed)[0] == big[0]
    assert generate_world(3, 6, seed)[2] == big[2]
    assert big[0] != big[1]


def test_names_distinct_across_world():
    world = generate_world(60, 1, 3)  # 120 speakers: more than the first-name pool
    names = [c["conversation"][k] for c in world for k in ("speaker_a", "speaker_b")]
    assert len(set(names)) == len(names) == 120


def test_session_date_format_matches_locomo():
    conv = generate_world(1, 5, 1)[0]["conversation"]
    for s in range(1, 6):
        assert re.fullmatch(r"\d{1,2}:\d{2} (am|pm) on \d{1,2} [A-Z][a-z]+, \d{4}",
                            conv[f"session_{s}_date_time"])


@pytest.mark.parametrize("kwargs, name", [
    (dict(conversations=0, sessions=3, seed=1), "conversations"),
    (dict(conversations=1, sessions=0, seed=1), "sessions"),
    (dict(conversations=1, sessions=-2, seed=1), "sessions"),
    (dict(conversations=1.5, sessions=3, seed=1), "conversations"),
    (dict(conversations=1, sessions=3, seed="x"), "seed"),
    (dict(conversations=True, sessions=3, seed=1), "conversations"),
    (dict(conversations=1, sessions=3, seed=1, turns_per_session=1), "turns_per_session"),
    (dict(conversations=1, sessions=3, seed=1, facts_per_session=0), "facts_per_session"),
    (dict(conversations=1, sessions=3, seed=1, turns_per_session=4, facts_per_session=4),
     "facts_per_session"),
])
def test_bad_arguments_raise(kwargs, name, tmp_path):
    with pytest.raises(ValueError) as err:
        generate_world(**kwargs)
    msg = str(err.value)
    assert msg.startswith(name) and "\n" not in msg
    with pytest.raises(ValueError, match=name):
        write_world(tmp_path / "w.json", **kwargs)
    assert not (tmp_path / "w.json").exists()
