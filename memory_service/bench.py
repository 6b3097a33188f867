"""`memr2 bench memory`: what a snapshot costs, against deep copies and the pickle-on-disk caching of
the reference implementation, and what an operation and a retrieval cost, per bank size."""

from __future__ import annotations

import copy
import pickle
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common.types import Operation
from memory_service.bank import MemoryBank

_NAMES = ["Alice", "Bob", "Chen", "Dana", "Eitan", "Farah"]
_VERBS = ["moved to", "started working at", "adopted a pet from", "took up painting in", "visited", "sold a car in"]
_PLACES = ["Denver", "Lisbon", "Osaka", "a bakery", "the city hospital", "a startup", "Nairobi", "a school"]


def _fact(rng: random.Random, i: int) -> str:
    return f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} {rng.choice(_PLACES)} in month {i % 12 + 1} of year {2020 + i % 5}"


def build_bank(size: int, seed: int = 0, retriever: str = "bm25") -> MemoryBank:
    rng = random.Random(seed)
    bank = MemoryBank.empty(retriever)
    for i in range(size):
        op = Operation("INSERT", speaker=rng.choice(_NAMES), content=_fact(rng, i), dia_id=f"D{i // 20 + 1}:{i % 20 + 1}")
        bank = bank.apply(op, "1:56 pm on 8 May, 2023")
    return bank


def _median_us(fn: Callable[[], object], repeats: int, inner: int = 1) -> float:
    """Median over `repeats` timings of `inner` calls each, in microseconds per call."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples) * 1e6


def _pickle_roundtrip(bank: MemoryBank, path: Path) -> MemoryBank:
    with path.open("wb") as f:
        pickle.dump(bank, f, protocol=pickle.HIGHEST_PROTOCOL)
    with path.open("rb") as f:
        return pickle.load(f)


def bench_size(size: int, seed: int = 0) -> dict[str, float]:
    bank = build_bank(size, seed)
    rng = random.Random(seed + 1)
    ids = list(bank.items.keys())
    heavy = max(3, min(20, 200_000 // size))  # fewer repeats for the O(n) baselines at 10k
    ops = [
        Operation("INSERT", speaker="Alice", content=_fact(rng, 1)),
        Operation("UPDATE", memory_id=rng.choice(ids), content=_fact(rng, 2)),
        Operation("DELETE", memory_id=rng.choice(ids)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "snapshot.pkl"
        assert _pickle_roundtrip(bank, path).as_dict() == bank.as_dict()
        pickle_us = _median_us(lambda: _pickle_roundtrip(bank, path), heavy)
    copied = copy.deepcopy(bank)
    assert copied is not bank and copied.as_dict() == bank.as_dict()
    return {
        "size": size,
        "fork_us": _median_us(bank.fork, 15, inner=2000),
        "deepcopy_us": _median_us(lambda: copy.deepcopy(bank), heavy),
        "pickle_disk_us": pickle_us,
        "apply_us": statistics.mean(_median_us(lambda op=op: bank.apply(op), 15, inner=20) for op in ops),
        "retrieve_us": _median_us(lambda: bank.retrieve("where did Alice move for her new job", 25), 15),
    }


def run_memory_bench(sizes: tuple[int, ...] = (100, 1_000, 10_000), seed: int = 0) -> dict:
    return {"results": [bench_size(size, seed) for size in sizes]}
