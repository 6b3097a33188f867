"""Memory semantics: operations, O(1) forks that never leak into their parent, M-Fail, retrieval."""

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.types import Operation
from memory_service.bank import InvalidOperation, MemoryBank

WORDS = ["alice", "moved", "denver", "dog", "rex", "job", "nurse", "bakery", "sister", "paints", "runs", "bob"]
text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)
# Ids 0..11 cover existing and non-existing memories alike.
memory_id = st.integers(0, 11).map(str)
operation = st.one_of(
    st.builds(Operation, op=st.just("INSERT"), speaker=st.sampled_from(["Alice", "Bob"]), content=text, dia_id=st.sampled_from(["D1:1", "D2:3", None])),
    st.builds(Operation, op=st.just("UPDATE"), memory_id=memory_id, content=text, dia_id=st.sampled_from(["D3:1", None])),
    st.builds(Operation, op=st.just("DELETE"), memory_id=memory_id),
    st.just(Operation("NOOP")),
)


def bank_from(ops, retriever="bm25") -> MemoryBank:
    bank, _ = MemoryBank.empty(retriever).apply_all(ops, "8 May, 2023")
    return bank


def reference_apply(state: dict, next_id: int, op: Operation) -> tuple[dict, int]:
    """A plain-dict model of the semantics, written independently of the bank."""
    state = dict(state)
    if op.op == "INSERT":
        state[str(next_id)] = (op.speaker, op.content.strip())
        return state, next_id + 1
    if op.op in ("UPDATE", "DELETE") and op.memory_id in state:
        if op.op == "UPDATE":
            state[op.memory_id] = (state[op.memory_id][0], op.content.strip())
        else:
            del state[op.memory_id]
    return state, next_id


@settings(max_examples=150, deadline=None)
@given(st.lists(operation, max_size=25))
def test_bank_matches_a_plain_dict_model(ops):
    bank, state, next_id = MemoryBank.empty(), {}, 0
    for op in ops:
        bank, _ = bank.apply_all([op])
        state, next_id = reference_apply(state, next_id, op)
    assert {m.id: (m.speaker, m.content) for m in bank} == state
    assert bank.tokens == sum(len(c.split()) for _, c in state.values())  # WORDS have no punctuation


@settings(max_examples=150, deadline=None)
@given(st.lists(operation, max_size=15), st.lists(operation, max_size=15))
def test_operations_on_a_fork_never_change_the_parent(before, after):
    parent = bank_from(before)
    picture = parent.as_dict()
    hits = [m.id for m in parent.retrieve("alice denver dog", 5)]
    child, _ = parent.fork().apply_all(after)
    assert parent.as_dict() == picture
    assert [m.id for m in parent.retrieve("alice denver dog", 5)] == hits
    assert len(parent) == len(picture) and parent.tokens == sum(len(v["content"].split()) for v in picture.values())
    # The child's index follows the child: everything it retrieves exists in it.
    assert all(m.id in child for m in child.retrieve("alice denver dog", 25))


@settings(max_examples=100, deadline=None)
@given(st.lists(operation, max_size=20), memory_id)
def test_invalid_ids_are_rejected_without_changing_the_bank(ops, mid):
    bank = bank_from(ops)
    if mid in bank:
        return
    picture = bank.as_dict()
    for op in (Operation("UPDATE", memory_id=mid, content="x y"), Operation("DELETE", memory_id=mid)):
        with pytest.raises(InvalidOperation, match=f"unknown memory id '{mid}'"):
            bank.apply(op)
    assert bank.as_dict() == picture


@settings(max_examples=50, deadline=None)
@given(st.lists(operation, max_size=20))
def test_a_restored_snapshot_equals_the_original(ops):
    bank = bank_from(ops)
    restored = bank.fork()  # the snapshot a local branch starts from
    later, _ = restored.apply_all([Operation("INSERT", speaker="Bob", content="bob runs")])
    assert restored.as_dict() == bank.as_dict() != later.as_dict()
    assert restored.next_id == bank.next_id and restored.tokens == bank.tokens
    # Through pickle too: the form in which a snapshot crosses to another actor.
    unpickled = pickle.loads(pickle.dumps(restored))
    assert unpickled.as_dict() == bank.as_dict()
    assert [m.id for m in unpickled.retrieve("alice dog", 10)] == [m.id for m in bank.retrieve("alice dog", 10)]


def test_insert_update_delete_semantics():
    bank = MemoryBank.empty()
    bank = bank.apply(Operation("INSERT", speaker="Alice", content="Alice lives in Boston.", dia_id="D1:2"), "1 May 2023")
    bank = bank.apply(Operation("INSERT", speaker="Bob", content="Bob has a dog named Rex.", dia_id="D1:5"), "1 May 2023")
    assert [m.id for m in bank] == ["0", "1"]
    bank = bank.apply(Operation("UPDATE", memory_id="0", content="Alice lives in Denver.", dia_id="D2:1"), "9 June 2023")
    assert bank.get("0").content == "Alice lives in Denver."
    assert bank.get("0").dia_ids == ("D1:2", "D2:1") and bank.get("0").session_time == "9 June 2023"
    bank = bank.apply(Operation("DELETE", memory_id="1"))
    assert "1" not in bank and len(bank) == 1
    bank = bank.apply(Operation("INSERT", speaker="Bob", content="Bob adopted a cat.", dia_id="D2:4"))
    assert bank.get("2").content == "Bob adopted a cat."  # ids are never reused after a delete
    assert bank.apply(Operation("NOOP")) is bank
    for bad, msg in [
        (Operation("INSERT", speaker="Bob", content="  "), "INSERT needs non-empty content"),
        (Operation("INSERT", content="x"), "INSERT needs a speaker"),
        (Operation("UPDATE", memory_id="0", content=None), "UPDATE needs non-empty content"),
        (Operation("MERGE"), "unknown operation 'MERGE'"),
    ]:
        with pytest.raises(InvalidOperation, match=msg):
            bank.apply(bad)


def test_m_fail_counts_evidence_no_memory_cites():
    bank = bank_from([
        Operation("INSERT", speaker="A", content="a b", dia_id="D1:1"),
        Operation("INSERT", speaker="A", content="c d", dia_id="D1:2"),
    ])
    assert bank.m_fail(["D1:1", "D1:2", "D3:3", "D4:4"]) == 0.5
    assert bank.m_fail([]) == 0.0
    bank = bank.apply(Operation("DELETE", memory_id="0"))
    assert bank.m_fail(["D1:1", "D1:2"]) == 0.5


def test_bm25_ranks_the_related_memory_first_and_filters_by_speaker():
    bank = bank_from([
        Operation("INSERT", speaker="Alice", content="Alice moved to Denver for a nursing job."),
        Operation("INSERT", speaker="Bob", content="Bob adopted a beagle named Rex."),
        Operation("INSERT", speaker="Alice", content="Alice loves painting sunsets."),
        Operation("INSERT", speaker="Bob", content="Bob is moving to Denver next year."),
    ])
    assert bank.retrieve("Where does Alice work as a nurse?", 1)[0].id == "0"
    assert [m.id for m in bank.retrieve("dog named Rex", 2)] == ["1"]  # only memories sharing terms
    assert [m.speaker for m in bank.retrieve("moving to Denver", 5, speaker="Bob")] == ["Bob"]

