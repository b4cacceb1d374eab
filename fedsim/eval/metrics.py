"""Offline metrics: ROUGE-L, exact match, and averages that say what they left out.

Pure functions, no model and no API. ROUGE-L follows Lin (2004) and the `rouge-score` package's
defaults: lower-cased alphanumeric tokens, the F-measure of the longest common subsequence, no
stemming.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased runs of letters and digits (rouge-score's default tokenizer, no stemmer)."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of `prediction` against `reference`, in [0, 1]; 0 when either has no tokens."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def normalize_answer(text: str) -> str:
    """Whitespace collapsed and stripped; case and punctuation kept, because the built-in tasks
    (upper-casing, first letters) are about exactly those."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the answer is the reference, up to whitespace."""
    return normalize_answer(prediction) == normalize_answer(reference)


def mean_or_none(values: Iterable[float]) -> float | None:
    """Mean of the values, or None for none (JSON null, never NaN)."""
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize(
    rows: Iterable[dict[str, Any]], key: str, category_key: str = "category"
) -> dict[str, Any]:
    """Mean of `row[key]` over rows where it is a number, overall and per category.

    Rows whose value is None (an unparseable verdict, a failed request) are excluded, and counted:
    `{"mean": .., "n": counted, "excluded": left out, "by_category": {cat: {...}}}`.
    """
    groups: dict[str, list[Any]] = defaultdict(list)
    everything: list[Any] = []
    for row in rows:
        if key not in row:
            continue
        groups[row.get(category_key) or ""].append(row[key])
        everything.append(row[key])

    def stats(values: list[Any]) -> dict[str, Any]:
        numbers = [float(v) for v in values if v is not None]
        return {
            "mean": mean_or_none(numbers),
            "n": len(numbers),
            "excluded": len(values) - len(numbers),
        }

    return {**stats(everything), "by_category": {c: stats(v) for c, v in sorted(groups.items())}}


def perplexity(mean_loss: float | None) -> float | None:
    """exp(loss), or None where there is no loss (or it overflows)."""
    if mean_loss is None:
        return None
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return None
