import json
import math
from pathlib import Path

import pyarrow as pa
import pytest

from common.config import DataConfig
from common.data import DataError, load_conversations, split, stats
from common.types import STEP_SCHEMA, StepSample, samples_to_table, session_of, table_to_samples

LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo" / "locomo10.json"
needs_locomo = pytest.mark.skipif(not LOCOMO.is_file(), reason="LoCoMo is read from ../shared, beside the repo")


@needs_locomo
def test_locomo_stats_and_quirks():
    convs = load_conversations(LOCOMO)
    assert stats(convs) == {
        "conversations": 10,
        "sessions": 272,
        "turns": 5882,
        "qa_by_category": {"1": 282, "2": 321, "3": 96, "4": 841, "5": 446},
    }
    qa = [q for c in convs for q in c.qa]
    adversarial = [q for q in qa if q.category == 5]
    assert all(q.adversarial_answer for q in adversarial)
    assert sum(q.answer == "" for q in adversarial) == 444  # two category-5 items do carry an answer
    assert any(q.answer == "2022" for q in qa)  # integer answers become strings
    assert sum(not q.evidence for q in qa) == 4  # kept, not dropped
    # conv-26 has date_time keys for 35 sessions but turns for 19: only those 19 are sessions.
    conv26 = next(c for c in convs if c.sample_id == "conv-26")
    assert len(conv26.sessions) == 19


@needs_locomo
def test_reference_split():
    parts = split(load_conversations(LOCOMO), DataConfig(source="locomo"))
    assert [c.sample_id for c in parts["train"]] == ["conv-43", "conv-47"]
    assert [c.sample_id for c in parts["val"]] == ["conv-44"]
    assert len(parts["test"]) == 7 and {"conv-43", "conv-44", "conv-47"}.isdisjoint(c.sample_id for c in parts["test"])
    with pytest.raises(DataError, match="data.val_ids: no conversation 'conv-99'"):
        split(load_conversations(LOCOMO), DataConfig(source="locomo", val_ids=["conv-99"]))


def _write(tmp_path, obj) -> Path:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(obj))
    return path


def test_bad_data_files_name_the_field(tmp_path):
    good_turn = {"speaker": "A", "dia_id": "D1:1", "text": "hi"}
    conv = {"speaker_a": "A", "speaker_b": "B", "session_1_date_time": "x", "session_1": [good_turn]}
    with pytest.raises(DataError, match=r"\[0\] \(s1\)\.qa\[0\]\.category: must be 1-5, got 9"):
        load_conversations(_write(tmp_path, [{"sample_id": "s1", "conversation": conv, "qa": [{"question": "q", "answer": "a", "evidence": [], "category": 9}]}]))
    with pytest.raises(DataError, match=r"session_1\[0\]\.text: missing"):
        bad = dict(conv, session_1=[{"speaker": "A", "dia_id": "D1:1"}])
        load_conversations(_write(tmp_path, [{"sample_id": "s1", "conversation": bad, "qa": []}]))
    with pytest.raises(DataError, match="top level must be a list"):
        load_conversations(_write(tmp_path, {"a": 1}))
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_conversations(path)
    with pytest.raises(DataError, match="no such data file"):
        load_conversations(tmp_path / "nope.json")


def test_a_session_with_turns_and_no_date_names_file_conversation_and_key(tmp_path):
    turn = {"speaker": "A", "dia_id": "D2:1", "text": "hi"}
    good = {"speaker_a": "A", "speaker_b": "B", "session_1_date_time": "1:56 pm on 8 May, 2023", "session_1": [dict(turn, dia_id="D1:1")]}
    for conv, state in ((dict(good, session_2=[turn]), "missing"), (dict(good, session_2=[turn], session_2_date_time=" "), "empty")):
        path = _write(tmp_path, [{"sample_id": "s0", "conversation": good, "qa": []}, {"sample_id": "s1", "conversation": conv, "qa": []}])
        with pytest.raises(DataError) as err:
            load_conversations(path)
        assert str(err.value) == f"{path}[1] (s1).conversation.session_2_date_time: {state}, but session_2 has 1 turn(s)"
    # A session key with no turns needs no date (nothing of it reaches a prompt).
    path = _write(tmp_path, [{"sample_id": "s1", "conversation": dict(good, session_2=[]), "qa": []}])
    assert [s.index for s in load_conversations(path)[0].sessions] == [1, 2]


def test_session_of_tolerates_malformed_ids():
    assert session_of("D3:6") == 3
    assert [session_of(x) for x in ("D:11:26", "D", "D9:1 D4:4")] == [None, None, 9]


def test_step_samples_roundtrip_through_one_arrow_table():
    samples = [
        StepSample("extractor", [1, 2, 3], [4, 5], [-0.5, -1.25], "conv-1", 2, "conv-1/s2", "global", 0, 0.5, 1.0, 3, 1, 0.75),
        StepSample("manager", [7], [8, 9, 10], [-0.25, -2.0, -0.125], "conv-1", 2, "conv-1/s2/anchor0", "local", 1, 0.1, -1.0, 3, 1, 0.5),
    ]
    table = samples_to_table(samples)
    assert table.schema.equals(STEP_SCHEMA) and table.num_rows == 2
    assert table_to_samples(table) == samples  # the logprobs above are exact in float32
    assert table["chunk"].type == pa.int32() and table["oracle"].type == pa.float64()
    # A conversation without gold operations: the oracle travels as NaN (NaN != NaN, so apart).
    back = table_to_samples(samples_to_table([StepSample("extractor", [1], [2], [-0.5], "conv-9", 1, "conv-9/s1", "global", 0)]))
    assert back[0].chunk == 0 and math.isnan(back[0].oracle)
    with pytest.raises(ValueError, match="schema differs"):
        table_to_samples(pa.table({"role": ["x"]}))
