"""LoCoMo answer scoring: the benchmark's official token F1, plus BLEU-1.

`locomo_f1` reproduces snap-research/locomo `task_eval/evaluation.py` (its `normalize_answer`,
`f1_score`, `f1` and the per-category dispatch of `eval_question_answering`) result for result;
it is our own implementation, checked row by row against that code. The paper numbers we compare
with (DESIGN.md section 5) are computed this way, so every step below keeps the official quirks,
even odd ones (e.g. commas are deleted, not turned into spaces: "1,000" -> "1000").
"""

from __future__ import annotations

import functools
import json
import string
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

# The official code uses the third-party `regex` module (a dependency of nltk), whose Unicode
# notion of a word character, and so of `\b`, differs from `re` (combining marks, "²", "½").
import regex
from nltk.stem import PorterStemmer
from nltk.tokenize import word_tokenize
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rich.console import Console
from rich.table import Table

CATEGORY_NAMES = MappingProxyType(
    {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
)
# Category 5 (adversarial: unanswerable) credits an abstention, whatever the gold answer.
ABSTAIN_PHRASES = ("no information available", "not mentioned")

_DROP_PUNCT = str.maketrans("", "", string.punctuation)  # ASCII only, as upstream
_DROP_WORDS = regex.compile(r"\b(a|an|the|and)\b")


class ScoringError(ValueError):
    """Bad scoring input; the message is one line naming the row (or line) and the field."""


@functools.cache
def _stemmer() -> PorterStemmer:
    return PorterStemmer()  # default mode (NLTK_EXTENSIONS), as upstream


@functools.lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    # Rewards score thousands of short answers with a small vocabulary: memoise the stemmer.
    return _stemmer().stem(word)


def normalize_answer(text: str) -> str:
    """LoCoMo normalisation, in the official order: delete commas, lowercase, delete ASCII
    punctuation, blank out the words a/an/the/and, collapse whitespace."""
    text = text.replace(",", "").lower().translate(_DROP_PUNCT)
    return " ".join(_DROP_WORDS.sub(" ", text).split())


def _tokens(text: str) -> list[str]:
    return [_stem(word) for word in normalize_answer(text).split()]


def token_bag(text: str) -> Counter[str]:
    """The multiset of stemmed, normalised tokens `token_f1` compares: made once per text by a
    caller that scores one text against many (actors.agent.oracle)."""
    return Counter(_tokens(text))


def bags_f1(pred: Counter[str], ref: Counter[str]) -> float:
    """`token_f1` on two token bags (the multiset intersection counted without building it)."""
    small, large = (pred, ref) if len(pred) <= len(ref) else (ref, pred)
    num_same = sum(min(n, large[t]) for t, n in small.items() if t in large)
    if num_same == 0:
        return 0.0
    precision = num_same / sum(pred.values())
    recall = num_same / sum(ref.values())
    return (2 * precision * recall) / (precision + recall)  # same operation order as upstream


def token_f1(prediction: str, gold: str) -> float:
    """Multiset F1 over stemmed, normalised tokens; 0 when nothing overlaps, including when
    either side normalises to nothing (so "the" vs "the" scores 0, as upstream)."""
    return bags_f1(token_bag(prediction), token_bag(gold))


def multi_answer_f1(prediction: str, gold: str) -> float:
    """Category 1: split both sides on ','; each gold part takes its best F1 over the predicted
    parts; average over gold parts (so an extra wrong predicted part costs nothing)."""
    preds = [part.strip() for part in prediction.split(",")]
    golds = [part.strip() for part in gold.split(",")]
    best = [max(token_f1(pred, ref) for pred in preds) for ref in golds]
    # numpy's pairwise summation, as upstream: sum() can differ in the last bit from 8 parts on.
    return float(np.mean(best))


def _is_abstention(prediction: str) -> bool:
    lowered = prediction.lower()
    return any(phrase in lowered for phrase in ABSTAIN_PHRASES)


def _check_category(category: Any) -> int:
    # bool is an int subclass and upstream's `in [1]` would accept True; we refuse it.
    valid = isinstance(category, int) and not isinstance(category, bool)
    if not valid or category not in CATEGORY_NAMES:
        raise ScoringError(f"category must be 1-5, got {category!r}")
    return category


def locomo_f1(prediction: str, answer: Any, category: int) -> float:
    """Official per-category F1. The answer is str()-ed first (LoCoMo has integer answers such as
    2022). Category 3 keeps the gold up to the first ';'. Category 5 ignores the answer (None is
    fine there). Upstream crashes on a non-string prediction; we raise TypeError instead."""
    category = _check_category(category)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}")
    if category == 5:
        return 1.0 if _is_abstention(prediction) else 0.0
    if answer is None:  # upstream would score against the word "None": never what anyone meant
        raise ScoringError(f"category {category} needs an answer, got None")
    gold = str(answer)
    if category == 3:
        gold = gold.split(";")[0].strip()
    if category == 1:
        return multi_answer_f1(prediction, gold)
    return token_f1(prediction, gold)


def bleu1(prediction: str, answer: Any) -> float:
    """BLEU-1 as reported next to LoCoMo F1 by Mem0, Memory-R1 and Memory-R2: NLTK
    `sentence_bleu` with weights (1, 0, 0, 0) and `SmoothingFunction().method1`, on NLTK word
    tokens of the lowercased text; 0 when either side has no token (Mem0 returns 0 for empty
    inputs). Mem0 calls `word_tokenize`, which first splits sentences with punkt; punkt needs a
    data download that we cannot do, so we tokenize with `preserve_line=True` (no sentence
    split). The two differ only on a '.' that ends a sentence inside the text ("2023. she" gives
    "2023." here, "2023", "." there); short answers are almost always one sentence.
    Category 5 is not handled here: `score_rows` applies the abstention rule to it instead."""
    hypothesis = word_tokenize(str(prediction).lower(), preserve_line=True)
    reference = word_tokenize(str(answer).lower(), preserve_line=True)
    if not hypothesis or not reference:
        return 0.0
    smoothing = SmoothingFunction().method1
    score = sentence_bleu([reference], hypothesis, weights=(1, 0, 0, 0),
                          smoothing_function=smoothing)
    return float(score)


def _score_row(row: Any, where: str) -> dict:
    """Validate one row and return a copy with `f1` and `bleu1`; errors name `where`."""
    if not isinstance(row, dict):
        raise ScoringError(f"{where}: expected an object, got {type(row).__name__}")
    for field in ("question", "category", "prediction"):
        if field not in row:
            raise ScoringError(f"{where}: missing field {field!r}")
    try:
        category = _check_category(row["category"])
    except ScoringError as err:
        raise ScoringError(f"{where}: {err}") from None
    for field in ("question", "prediction"):
        if not isinstance(row[field], str):
            kind = type(row[field]).__name__
            raise ScoringError(f"{where}: field {field!r} must be a string, got {kind}")
    answer = row.get("answer")
    if category != 5:
        if "answer" not in row:
            raise ScoringError(f"{where}: missing field 'answer'")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            kind = type(answer).__name__
            raise ScoringError(f"{where}: field 'answer' must be a string or number, got {kind}")
    scored = dict(row)
    scored["f1"] = locomo_f1(row["prediction"], answer, category)
    # Adversarial rows usually carry no gold answer: BLEU-1 uses the same abstention rule there.
    scored["bleu1"] = scored["f1"] if category == 5 else bleu1(row["prediction"], answer)
    return scored


def score_rows(rows: Iterable[dict]) -> list[dict]:
    """Score rows with `question`, `category`, `prediction` and (except for category 5) `answer`.
    Returns new dicts with `f1` and `bleu1` added; rows are numbered from 1 in error messages."""
    return [_score_row(row, f"row {number}") for number, row in enumerate(rows, start=1)]


def _aggregate(rows: list[dict]) -> dict:
    count = len(rows)
    if count == 0:  # no mean exists; None rather than a misleading 0
        return {"count": 0, "f1": None, "bleu1": None}
    return {
        "count": count,
        "f1": sum(row["f1"] for row in rows) / count,
        "bleu1": sum(row["bleu1"] for row in rows) / count,
    }


def summarize(scored_rows: Iterable[dict]) -> dict:
    """Means as fractions in [0, 1]. Keys: "1".."5" (categories present, each with its "name"),
    "all", and "all_excl_5" (category 5 left out, as the papers report). String keys keep the
    summary JSON-round-trippable."""
    rows = list(scored_rows)
    for number, row in enumerate(rows, start=1):
        for field in ("category", "f1", "bleu1"):
            if field not in row:
                raise ScoringError(f"row {number}: missing field {field!r}")
    summary: dict[str, dict] = {}
    for category in sorted({row["category"] for row in rows}):
        members = [row for row in rows if row["category"] == category]
        summary[str(category)] = {"name": CATEGORY_NAMES.get(category, "?"), **_aggregate(members)}
    summary["all_excl_5"] = _aggregate([row for row in rows if row["category"] != 5])
    summary["all"] = _aggregate(rows)
    return summary


def bootstrap_ci(values: Iterable[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (questions resampled with replacement); seeded,
    so the same scores always give the same interval. None for no values."""
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        return None
    means = np.random.default_rng(seed).choice(data, size=(resamples, data.size)).mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


# Optional columns: `memr2 eval` adds M-Fail, and J when a judge ran.
_EXTRA_COLUMNS = (("j", "J (%)"), ("m_fail", "M-Fail (%)"))


def render_table(summary: dict, title: str = "LoCoMo scores") -> Table:
    """Per-category table, scores in percent (the papers' convention)."""
    extra = [(key, header) for key, header in _EXTRA_COLUMNS if any(key in stats for stats in summary.values())]
    table = Table(title=title)
    for header in ("category", "name", "count"):
        table.add_column(header, justify="right" if header == "count" else "left")
    for header in ("F1 (%)", "BLEU-1 (%)", *(header for _, header in extra)):
        table.add_column(header, justify="right")
    categories = [key for key in summary if key not in ("all", "all_excl_5")]
    labels = {key: summary[key]["name"] for key in categories} | {"all_excl_5": "overall, excl. 5", "all": "overall"}
    for key in (*categories, "all_excl_5", "all"):
        stats = summary[key]
        scores = [_percent(stats.get(name)) for name in ("f1", "bleu1", *(k for k, _ in extra))]
        table.add_row(key, labels[key], str(stats["count"]), *scores,
                      end_section=bool(categories) and key == categories[-1])
    return table


def score_file(in_path: str | Path, out_path: str | Path, console: Console | None = None) -> dict:
    """Score a JSONL file (blank lines skipped) into another, same row order; print the table to
    `console` (stderr by default, keeping stdout clean) and return the summary. Nothing is
    written unless every line scores, and errors name the 1-based line number."""
    scored = []
    with open(in_path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                reason = f"{err.msg} at column {err.colno}"
                raise ScoringError(f"line {number}: invalid JSON ({reason})") from None
            scored.append(_score_row(row, f"line {number}"))
    with open(out_path, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in scored)
    summary = summarize(scored)
    (console or Console(stderr=True)).print(render_table(summary))
    return summary
