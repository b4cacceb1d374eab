"""Offline metrics with hand-computed expectations."""

import math

import pytest

from fedsim.eval.metrics import (
    exact_match,
    lcs_length,
    perplexity,
    rouge_l,
    rouge_tokens,
    summarize,
)


def test_rouge_tokens_lower_case_alphanumerics():
    assert rouge_tokens("The CAT, sat; on 2 mats!") == ["the", "cat", "sat", "on", "2", "mats"]


def test_lcs_length():
    assert lcs_length(["a", "b", "c", "d"], ["a", "c", "d"]) == 3
    assert lcs_length(["a", "b"], ["c", "d"]) == 0
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(["x", "a", "y", "b"], ["a", "b"]) == 2


def test_rouge_l_hand_computed():
    # prediction 4 tokens, reference 3, LCS "the cat mat" = 3: P 3/4, R 3/3, F = 2PR/(P+R) = 6/7
    assert rouge_l("the cat on mat", "the cat mat") == pytest.approx(6 / 7)
    assert rouge_l("Draw River", "draw river") == 1.0
    assert rouge_l("river draw", "draw river") == pytest.approx(0.5)  # LCS 1 of 2 and 2
    assert rouge_l("", "draw river") == 0.0
    assert rouge_l("boat", "draw river") == 0.0


def test_exact_match_ignores_whitespace_only():
    assert exact_match("  CAT  DOG\n", "CAT DOG")
    assert not exact_match("cat dog", "CAT DOG")  # the uppercase task is about case
    assert not exact_match("45.", "45")


def test_summarize_excludes_none_and_says_how_many():
    rows = [
        {"category": "a", "score": 4},
        {"category": "a", "score": None},
        {"category": "b", "score": 8},
        {"category": "b", "score": 6},
        {"category": "b"},  # no value at all: not part of this metric
    ]
    s = summarize(rows, "score")
    assert s["mean"] == pytest.approx(6.0) and s["n"] == 3 and s["excluded"] == 1
    assert s["by_category"]["a"] == {"mean": 4.0, "n": 1, "excluded": 1}
    assert s["by_category"]["b"] == {"mean": 7.0, "n": 2, "excluded": 0}
    empty = summarize([{"category": "a", "score": None}], "score")
    assert empty["mean"] is None and empty["excluded"] == 1


def test_perplexity():
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(None) is None
    assert perplexity(1e6) is None
