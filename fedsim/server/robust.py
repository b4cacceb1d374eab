"""Robust aggregation rules over one round's buffered client deltas.

Unlike the streaming weighted mean, these rules need every update of the round at once, so the
aggregator buffers the round's (decoded, clipped) deltas when one is configured: one adapter per
client in memory. The deltas are ordered by client id before a rule runs, so the result does not
depend on arrival order. The rules ignore sample weights (a weight would let one client claim a
large share). Each needs a minimum number of updates for its assumption of at most `f` faulty
ones; `min_updates` says how many, and the aggregator keeps the previous adapter (and says so)
when a round has fewer.
"""

from __future__ import annotations

import math

import torch

# The rule's own statement of what it needs lives with the config, which checks it at load time.
from fedsim.config import min_updates as min_updates

TensorDict = dict[str, torch.Tensor]


def _stack(deltas: list[TensorDict], key: str) -> torch.Tensor:
    return torch.stack([d[key].double() for d in deltas])


def coordinate_median(deltas: list[TensorDict]) -> TensorDict:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    n = len(deltas)
    out = {}
    for key in deltas[0]:
        ordered = _stack(deltas, key).sort(dim=0).values
        out[key] = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return out


def trimmed_mean(deltas: list[TensorDict], beta: float) -> TensorDict:
    """Coordinate-wise mean after dropping the floor(beta*n) smallest and largest values."""
    n = len(deltas)
    k = math.floor(beta * n)
    return {key: _stack(deltas, key).sort(dim=0).values[k : n - k].mean(dim=0) for key in deltas[0]}


def krum_scores(deltas: list[TensorDict], f: int) -> list[float]:
    """Krum score of each update: the sum of squared distances to its n - f - 2 nearest others."""
    flat = torch.stack([torch.cat([d[k].double().flatten() for k in sorted(d)]) for d in deltas])
    dist = torch.cdist(flat, flat).pow(2)
    n, nearest = len(deltas), max(1, len(deltas) - f - 2)
    scores = []
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
        scores.append(float(others.sort().values[:nearest].sum()))
    return scores


def krum(deltas: list[TensorDict], f: int, m: int = 1) -> tuple[TensorDict, list[int]]:
    """(Multi-)Krum (Blanchard et al. 2017): the mean of the `m` updates with the lowest scores
    (m = 1: Krum picks one). Returns the mean and the chosen positions (ties: lower position)."""
    scores = krum_scores(deltas, f)
    chosen = sorted(sorted(range(len(deltas)), key=lambda i: (scores[i], i))[:m])
    return {k: _stack([deltas[i] for i in chosen], k).mean(dim=0) for k in deltas[0]}, chosen


def robust_aggregate(
    rule: str, deltas: list[TensorDict], f: int, beta: float, multi_krum_m: int | None
) -> tuple[TensorDict, dict]:
    """Apply `rule` to the round's deltas (in client order); returns (delta, details)."""
    if rule == "median":
        return coordinate_median(deltas), {}
    if rule == "trimmed_mean":
        return trimmed_mean(deltas, beta), {"trimmed_each_end": math.floor(beta * len(deltas))}
    if rule in ("krum", "multi_krum"):
        m = 1 if rule == "krum" else (multi_krum_m or len(deltas) - f)
        mean, chosen = krum(deltas, f, m)
        return mean, {"chosen": chosen}
    raise ValueError(f"unknown robust rule {rule!r}")
