"""A synthetic world through the same loader as LoCoMo, and its gold operations through the bank."""

from common.data import load_conversations, stats
from common.synth import write_world
from common.types import Operation
from memory_service.bank import MemoryBank


def replay_gold(conv) -> MemoryBank:
    bank, id_of = MemoryBank.empty(), {}
    for g in conv.gold_operations:
        if g.op == "INSERT":
            id_of[g.key] = str(bank.next_id)
            op = Operation("INSERT", speaker=g.speaker, content=g.content, dia_id=g.dia_id)
        else:
            op = Operation(g.op, memory_id=id_of.pop(g.key) if g.op == "DELETE" else id_of[g.key], content=g.content, dia_id=g.dia_id)
        bank = bank.apply(op)  # raises if the gold operations were inconsistent
    return bank


def test_synthetic_world_loads_and_its_gold_operations_build_a_bank_that_answers(tmp_path):
    path = tmp_path / "w.json"
    write_world(path, conversations=2, sessions=12, seed=3)
    convs = load_conversations(path)
    s = stats(convs)
    assert s["conversations"] == 2 and s["sessions"] == 24 and s["turns"] == 240
    for conv in convs:
        bank = replay_gold(conv)
        assert len(bank) > 0
        for qa in conv.qa:
            if qa.kind in ("knowledge-update", "single-hop") and qa.answer not in ("Yes", "No"):
                # The ideal bank holds the latest value, and cites the turn that stated it.
                assert any(qa.answer.lower() in m.content.lower() for m in bank), qa
                assert bank.m_fail(qa.evidence[-1:]) == 0.0, qa
