"""The packaged all-MiniLM-L6-v2 retriever: loads offline, ranks by meaning, forks with the bank."""

import pytest

from common.types import Operation
from memory_service.bank import MemoryBank

pytestmark = pytest.mark.slow


def test_minilm_ranks_by_meaning_and_forks_with_the_bank(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bank = MemoryBank.empty("minilm")
    for content in ["Bob adopted a beagle puppy.", "Alice works as a nurse in Denver.", "Bob's favourite food is ramen."]:
        bank = bank.apply(Operation("INSERT", speaker="Bob", content=content))
    # No word in common with the memory: only an embedding can find it.
    assert bank.retrieve("Which canine does he own?", 1)[0].content == "Bob adopted a beagle puppy."
    child = bank.fork().apply(Operation("DELETE", memory_id="0"))
    assert child.retrieve("Which canine does he own?", 1)[0].id != "0"
    assert bank.retrieve("Which canine does he own?", 1)[0].id == "0"
