"""Offline metrics: ROUGE-L, exact match, and averages that say what they left out.

Pure functions, no model and no API, except `heldout_exact_match`, which decodes with a given
model (torch is imported only there). ROUGE-L follows Lin (2004) and the `rouge-score` package's
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


# ---------------------------------------------------------------------------------------------
# Held-out exact match during training (the one function here that runs a model)
# ---------------------------------------------------------------------------------------------


def probe_records(records: Sequence[dict[str, Any]], per_category: int) -> list[dict[str, Any]]:
    """The first `per_category` records of each category, in their order: a fixed, cheap probe
    set for scoring every round (the test split's records, never training ones)."""
    taken: dict[str, int] = defaultdict(int)
    out = []
    for record in records:
        category = record.get("category") or ""
        if taken[category] < per_category:
            taken[category] += 1
            out.append(record)
    return out


def exact_match_by_category(
    predictions: Sequence[str], records: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """`{"mean": .., "by_category": {category: mean}}` of exact match of each prediction against
    its record's `response`."""
    rows = [
        {"category": r.get("category") or "", "exact_match": float(exact_match(p, r["response"]))}
        for p, r in zip(predictions, records, strict=True)
    ]
    summary = summarize(rows, "exact_match")
    return {
        "mean": summary["mean"],
        "by_category": {c: s["mean"] for c, s in summary["by_category"].items()},
    }


def heldout_exact_match(
    model: Any,
    tokenizer: Any,
    template: Any,
    records: Sequence[dict[str, Any]],
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Exact match of `model` (a causal LM, e.g. the PEFT model with the round's adapter loaded)
    on `records` (instruction, context, response, category), greedy decoding of at most
    `max_new_tokens` tokens after the `template`'s prompt: `exact_match_by_category`'s dict.

    Cheap enough for every round on the tiny model: 0.14 s for `probe_records(test, 5)` (40
    prompts), 0.27 s for the quickstart's whole test split (80), on one core; the figures agree
    with `fedsim eval`'s exact match of the same adapter. Prompts are left-padded so that every
    row continues its own prompt; the model is left in eval mode.
    """
    from fedsim.model import greedy_generate  # torch and transformers only when a model runs

    prompts = [template.render(r["instruction"], r.get("context") or "") for r in records]
    predictions: list[str] = []
    model.eval()
    for lo in range(0, len(prompts), batch_size):
        predictions += greedy_generate(
            model, tokenizer, prompts[lo : lo + batch_size], max_new_tokens
        )
    return exact_match_by_category(predictions, records)
