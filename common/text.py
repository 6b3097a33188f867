"""Tokenisation shared by retrieval and the compression penalty.

Token counts for the compression penalty (DESIGN §2) use one model-independent word-piece count
for both the memory bank and the dialogue, so the ratio means the same whatever policy is trained.
"""

from __future__ import annotations

import re
from functools import lru_cache

from nltk.stem import PorterStemmer

_PIECE = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"[a-z0-9]+")

# Words too common to say anything about relatedness; kept short on purpose.
STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being "
    "it its this that these those i me my we our you your he him his she her they them their "
    "do does did have has had not no so than then there here what which who whom how when where "
    "will would can could should just very about into over also".split()
)


def count_tokens(text: str) -> int:
    return len(_PIECE.findall(text))


@lru_cache(maxsize=1)
def _stemmer() -> PorterStemmer:
    return PorterStemmer()


@lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    return _stemmer().stem(word)


def index_terms(text: str) -> list[str]:
    """Lowercased, stop-word-free, Porter-stemmed terms for lexical retrieval."""
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS]
