"""Tests for common.scoring: LoCoMo's official token F1, BLEU-1, row/file scoring."""

import io
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from common.scoring import (
    ScoringError,
    bleu1,
    locomo_f1,
    multi_answer_f1,
    normalize_answer,
    render_table,
    score_file,
    score_rows,
    summarize,
    token_f1,
)

# ---------------------------------------------------------------- normalisation


def test_normalize_drops_articles_and_punctuation():
    assert normalize_answer("The cat, and a dog!") == "cat dog"
    assert normalize_answer("  An  apple\tTHE end ") == "apple end"


def test_normalize_deletes_commas_and_punctuation_without_spacing():
    # Upstream deletes commas (not -> space) and punctuation, so pieces glue together.
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("Don't stop.") == "dont stop"
    assert normalize_answer("the-end") == "theend"  # 'the' is no longer a separate word


def test_normalize_only_removes_whole_words():
    assert normalize_answer("Theatre and android") == "theatre android"


def test_normalize_uses_regex_module_word_boundaries():
    # With `regex`, a combining accent is part of the word, so "á" is not the article "a";
    # Python's `re` would strip the "a" and leave the bare accent.
    assert normalize_answer("a\u0301 dog") == "a\u0301 dog"


# ---------------------------------------------------------------- token F1


def test_exact_match_is_one():
    assert token_f1("Paris", "paris") == 1.0


def test_no_overlap_is_zero():
    assert token_f1("London", "Paris") == 0.0


def test_partial_overlap_superset_prediction():
    # pred {red, blue, green}, gold {red, blue}: common 2, P = 2/3, R = 1,
    # F1 = 2 * 2/3 * 1 / (2/3 + 1) = (4/3) / (5/3) = 0.8
    assert token_f1("red blue green", "red blue") == pytest.approx(0.8)


def test_partial_overlap_known_precision_recall():
    # pred [went, to, pari, in, may], gold [pari, in, june]: common 2, P = 2/5, R = 2/3,
    # F1 = 2 * (2/5)(2/3) / (2/5 + 2/3) = (8/15) / (16/15) = 0.5
    assert token_f1("went to Paris in May", "Paris in June") == pytest.approx(0.5)


def test_articles_and_punctuation_do_not_count():
    # "The dog!" -> [dog]; gold "dog" -> [dog]: 1.0 (without normalisation P would be 1/2)
    assert token_f1("The dog!", "dog") == 1.0


def test_porter_stemming():
    # running -> run, runs -> run
    assert token_f1("running", "runs") == 1.0
    # dogs -> dog, so [run, dog] vs [run, dog]
    assert token_f1("running dogs", "the dog runs") == 1.0


def test_multiset_counting():
    # {dog: 2, cat: 1} & {dog: 1, cat: 2} = 2 common; P = R = 2/3 -> F1 = 2/3
    assert token_f1("dog dog cat", "dog cat cat") == pytest.approx(2 / 3)
    # a repeated token is matched once: common 1, P = 1/2, R = 1 -> F1 = (2 * 1/2) / (3/2) = 2/3
    assert token_f1("dog dog", "dog") == pytest.approx(2 / 3)


def test_empty_after_normalisation_scores_zero():
    # Upstream returns 0 when nothing overlaps, which includes two empty token lists.
    assert token_f1("the", "the") == 0.0
    assert token_f1("", "") == 0.0
    assert token_f1("Paris", "...") == 0.0


# ---------------------------------------------------------------- per-category dispatch


def test_category_1_multi_answer_average():
    # gold parts: swimming -> 1 (matches), hiking -> 1, painting -> 0; mean = 2/3
    assert multi_answer_f1("hiking, swimming", "swimming, hiking, painting") == pytest.approx(2 / 3)
    assert locomo_f1("hiking, swimming", "swimming, hiking, painting", 1) == pytest.approx(2 / 3)


def test_category_1_unsplit_prediction_is_penalised():
    # pred part [swim, hike] vs gold part [swim]: P = 1/2, R = 1 -> 2/3; same for hiking; mean 2/3.
    assert locomo_f1("swimming and hiking", "swimming, hiking", 1) == pytest.approx(2 / 3)
    # Category 2 on the same strings: gold normalises to [swim, hike] -> exact match.
    assert locomo_f1("swimming and hiking", "swimming, hiking", 2) == 1.0


def test_category_3_cuts_gold_at_first_semicolon():
    assert locomo_f1("Yes", "Yes; it's classical music", 3) == 1.0
    # Category 4 keeps the whole gold [ye, it, classic, music]: P = 1, R = 1/4 -> 2 * 1/4 / (5/4) = 0.4
    assert locomo_f1("Yes", "Yes; it's classical music", 4) == pytest.approx(0.4)


def test_category_5_phrases():
    assert locomo_f1("Not mentioned in the conversation.", None, 5) == 1.0
    assert locomo_f1("NO INFORMATION AVAILABLE", "whatever", 5) == 1.0
    assert locomo_f1("No info about that", None, 5) == 0.0
    assert locomo_f1("not  mentioned", None, 5) == 0.0  # a literal substring test


def test_integer_answers_are_stringified():
    assert locomo_f1("2022", 2022, 2) == 1.0
    # [in, 2022] vs [2022]: P = 1/2, R = 1 -> 2/3
    assert locomo_f1("In 2022", 2022, 2) == pytest.approx(2 / 3)
    assert locomo_f1("2022", 2022, 1) == 1.0


def test_locomo_f1_rejects_bad_inputs():
    with pytest.raises(TypeError):
        locomo_f1(2022, "2022", 2)
    with pytest.raises(ScoringError, match="category must be 1-5"):
        locomo_f1("x", "x", 6)
    with pytest.raises(ScoringError, match="category must be 1-5"):
        locomo_f1("x", "x", True)
    with pytest.raises(ScoringError, match="needs an answer"):
        locomo_f1("x", None, 2)


# ---------------------------------------------------------------- BLEU-1


def test_bleu1_values():
    assert bleu1("7 May 2023", "7 may 2023") == 1.0
    # hyp [paris], ref [paris, in, june]: p1 = 1, brevity penalty exp(1 - 3/1) = exp(-2)
    assert bleu1("Paris", "Paris in June") == pytest.approx(math.exp(-2))
    # hyp of 4 tokens, 1 matches: p1 = 1/4, no brevity penalty
    assert bleu1("Paris in June 2023", "Paris") == pytest.approx(0.25)
    assert bleu1("London", "Paris") == 0.0
    assert bleu1("", "Paris") == 0.0
    assert bleu1(2022, 2022) == 1.0


# ---------------------------------------------------------------- rows


def _row(**fields):
    return {"question": "q?", "category": 2, "prediction": "May 2023", "answer": "May 2023", **fields}


def test_score_rows_adds_scores_and_keeps_keys():
    rows = [_row(extra=1), _row(category=5, prediction="Not mentioned")]
    del rows[1]["answer"]
    scored = score_rows(rows)
    assert scored[0] == {**rows[0], "f1": 1.0, "bleu1": 1.0}
    assert scored[1]["f1"] == 1.0 and scored[1]["bleu1"] == 1.0  # abstention rule for both
    assert "f1" not in rows[0]  # inputs untouched


@pytest.mark.parametrize(
    "rows, message",
    [
        ([_row(), {"question": "q", "category": 2, "answer": "a"}], "row 2: missing field 'prediction'"),
        ([_row(category="x")], "row 1: category must be 1-5, got 'x'"),
        ([_row(category=0)], "row 1: category must be 1-5, got 0"),
        ([_row(category=2.0)], "row 1: category must be 1-5, got 2.0"),
        ([_row(category=[1])], "row 1: category must be 1-5, got [1]"),
        ([_row(category=True)], "row 1: category must be 1-5, got True"),
        ([_row(prediction=None)], "row 1: field 'prediction' must be a string, got NoneType"),
        ([{"question": "q", "category": 3, "prediction": "p"}], "row 1: missing field 'answer'"),
        ([_row(answer=["a"])], "row 1: field 'answer' must be a string or number, got list"),
        ([_row(), _row(), ["not", "a", "row"]], "row 3: expected an object, got list"),
    ],
)
def test_score_rows_errors(rows, message):
    with pytest.raises(ScoringError) as info:
        score_rows(rows)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_summarize_numbers():
    rows = [
        {"category": 1, "f1": 1.0, "bleu1": 0.5},
        {"category": 1, "f1": 0.5, "bleu1": 0.5},
        {"category": 2, "f1": 0.0, "bleu1": 0.25},
        {"category": 5, "f1": 1.0, "bleu1": 1.0},
    ]
    summary = summarize(rows)
    assert summary["1"] == {"name": "multi-hop", "count": 2, "f1": 0.75, "bleu1": 0.5}
    assert summary["2"]["count"] == 1 and summary["5"]["f1"] == 1.0
    # excl. 5: f1 (1 + 0.5 + 0) / 3 = 0.5, bleu1 (0.5 + 0.5 + 0.25) / 3 = 5/12
    assert summary["all_excl_5"]["count"] == 3
    assert summary["all_excl_5"]["f1"] == pytest.approx(0.5)
    assert summary["all_excl_5"]["bleu1"] == pytest.approx(5 / 12)
    # all: f1 2.5 / 4 = 0.625, bleu1 2.25 / 4 = 0.5625
    assert summary["all"] == {"count": 4, "f1": pytest.approx(0.625), "bleu1": pytest.approx(0.5625)}
    assert "3" not in summary and "4" not in summary


def test_summarize_without_rows_has_no_means():
    assert summarize([]) == {"all_excl_5": {"count": 0, "f1": None, "bleu1": None},
                             "all": {"count": 0, "f1": None, "bleu1": None}}


def test_render_table_rows():
    summary = summarize([{"category": 1, "f1": 0.5, "bleu1": 0.25}, {"category": 5, "f1": 1.0, "bleu1": 1.0}])
    table = render_table(summary)
    assert table.row_count == 4  # categories 1 and 5, then the two overall rows
    console = Console(file=io.StringIO(), width=120)
    console.print(table)
    text = console.file.getvalue()
    assert "multi-hop" in text and "50.00" in text and "25.00" in text


# ---------------------------------------------------------------- files


def test_score_file_round_trip(tmp_path):
    rows = [
        _row(prediction="In May 2023"),
        {"question": "q", "category": 5, "prediction": "Not mentioned", "adversarial_answer": "Yes"},
        _row(category=1, prediction="hiking, swimming", answer="swimming, hiking, painting"),
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    console = Console(file=io.StringIO(), width=120)
    summary = score_file(src, dst, console=console)
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["prediction"] for r in out] == [r["prediction"] for r in rows]  # same order, blank skipped
    # [in, may, 2023] vs [may, 2023]: P = 2/3, R = 1 -> 0.8
    assert out[0]["f1"] == pytest.approx(0.8)
    assert out[1]["f1"] == 1.0 and out[2]["f1"] == pytest.approx(2 / 3)
    assert summary["all"]["count"] == 3 and summary["all_excl_5"]["count"] == 2
    assert summary["all_excl_5"]["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert "open-domain" not in console.file.getvalue() and "adversarial" in console.file.getvalue()


def test_score_file_malformed_line(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(_row()) + "\n{not json\n")
    with pytest.raises(ScoringError, match=r"^line 2: invalid JSON"):
        score_file(src, dst, console=Console(file=io.StringIO()))
    assert not dst.exists()  # nothing written on error


def test_score_file_bad_row_names_line(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n" + json.dumps(_row()) + "\n" + json.dumps({"question": "q", "category": 4}) + "\n")
    with pytest.raises(ScoringError) as info:
        score_file(src, dst, console=Console(file=io.StringIO()))
    assert str(info.value) == "line 3: missing field 'prediction'"


# ---------------------------------------------------------------- properties

_words = st.lists(st.sampled_from(["a", "the", "and", "run", "running", "dog", "dogs", "2022", ",", ";", "May", "x!"]),
                  max_size=8).map(" ".join)
_texts = st.one_of(st.text(max_size=30), _words)


@settings(max_examples=200, deadline=None)
@given(prediction=_texts, gold=_texts, category=st.integers(1, 5))
def test_scores_are_in_unit_interval(prediction, gold, category):
    assert 0.0 <= locomo_f1(prediction, gold, category) <= 1.0
    assert 0.0 <= bleu1(prediction, gold) <= 1.0


@settings(max_examples=200, deadline=None)
@given(a=_texts, b=_texts)
def test_token_f1_is_symmetric(a, b):
    assert token_f1(a, b) == pytest.approx(token_f1(b, a))


@settings(max_examples=200, deadline=None)
@given(text=_texts)
def test_identical_strings_with_a_real_token_score_one(text):
    if normalize_answer(text):
        assert token_f1(text, text) == 1.0
    else:
        assert token_f1(text, text) == 0.0


def test_bootstrap_ci_brackets_the_mean_is_seeded_and_narrows_with_more_questions():
    from common.scoring import bootstrap_ci

    few = [0.0, 1.0, 0.5, 0.0, 1.0]
    low, high = bootstrap_ci(few)
    assert low <= sum(few) / len(few) <= high and 0.0 <= low < high <= 1.0
    assert bootstrap_ci(few) == (low, high)  # the same scores give the same interval
    many_low, many_high = bootstrap_ci(few * 20)
    assert many_high - many_low < high - low
    assert bootstrap_ci([0.25] * 7) == (0.25, 0.25)  # no spread, no interval
    assert bootstrap_ci([]) is None
