"""Update checks and the exact, order-independent streaming weighted mean of client deltas.

Workers finish in any order, and floating-point addition is not associative, so a running float
sum would make the global adapter depend on scheduling. `WeightedDeltaSum` instead rounds each
weighted term `n_i * (x_i - g)` once onto a fixed-point grid and adds the terms as int64: integer
addition is exact and commutative, so every arrival order gives the same bits, while memory stays
at one accumulator per tensor however many clients a round has.
"""

from __future__ import annotations

import math

import torch

from fedsim.errors import UpdateRejected

TensorDict = dict[str, torch.Tensor]

DELTA_LIMIT_EXP = 12
"""Updates whose delta from the global adapter reaches 2**12 in any element are rejected; the
bound fixes the fixed-point scale (values this large mean a diverged client, not a LoRA update)."""


def check_update(update: TensorDict, reference: TensorDict) -> None:
    """Raise UpdateRejected unless `update` has the reference's keys, shapes, dtypes, finite values
    and deltas within the representable range."""
    missing = reference.keys() - update.keys()
    extra = update.keys() - reference.keys()
    if missing or extra:
        raise UpdateRejected(
            f"keys differ from the global adapter (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]})"
        )
    limit = 2.0**DELTA_LIMIT_EXP
    for key, ref in reference.items():
        value = update[key]
        if value.shape != ref.shape:
            raise UpdateRejected(f"{key}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            raise UpdateRejected(f"{key}: dtype {value.dtype}, expected {ref.dtype}")
        if not torch.isfinite(value).all():
            raise UpdateRejected(f"{key}: non-finite values")
        if (value.double() - ref.double()).abs().max() >= limit:
            raise UpdateRejected(
                f"{key}: delta from the global adapter reaches 2**{DELTA_LIMIT_EXP}"
            )


class WeightedDeltaSum:
    """Streaming weighted mean of `update - reference`, bitwise independent of the order of `add`.

    `max_total_weight` bounds the sum of weights that may be added (for a round, the sample count
    of its selected clients); it fixes the fixed-point scale so that the int64 sum cannot overflow:
    |sum| <= W * 2**DELTA_LIMIT_EXP * 2**shift < 2**62. The mean's resolution is then
    2**-(62 - DELTA_LIMIT_EXP) = 2**-50, finer than float32 carries for any value above ~1e-7.
    """

    def __init__(self, reference: TensorDict, max_total_weight: int) -> None:
        if max_total_weight < 1:
            raise ValueError("max_total_weight must be >= 1")
        self.reference = reference
        self.max_total_weight = max_total_weight
        self.shift = 62 - DELTA_LIMIT_EXP - math.ceil(math.log2(max_total_weight))
        self.total_weight = 0
        self.count = 0
        self._acc = {k: torch.zeros(v.shape, dtype=torch.int64) for k, v in reference.items()}

    def add(self, update: TensorDict, weight: int) -> None:
        """Fold one client's adapter in with an integer weight (its sample count, or 1)."""
        if weight < 1 or self.total_weight + weight > self.max_total_weight:
            raise ValueError(f"weight {weight} exceeds the round's bound {self.max_total_weight}")
        check_update(update, self.reference)
        scale = float(weight) * 2.0**self.shift
        for key, acc in self._acc.items():
            delta = update[key].double() - self.reference[key].double()
            acc += torch.round(delta * scale).to(torch.int64)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> TensorDict:
        """The weighted mean delta over what was added, as float64 tensors."""
        if self.count == 0:
            raise ValueError("no update was added")
        scale = 2.0**-self.shift / self.total_weight
        return {k: acc.double() * scale for k, acc in self._acc.items()}


def weighted_mean(
    updates: list[TensorDict], weights: list[int], reference: TensorDict
) -> TensorDict:
    """Reference implementation for tests: mean of `updates` weighted by `weights`, in float64."""
    total = sum(weights)
    return {
        k: sum(
            w * (u[k].double() - reference[k].double())
            for u, w in zip(updates, weights, strict=True)
        )
        / total
        for k in reference
    }
