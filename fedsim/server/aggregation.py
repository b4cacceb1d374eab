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

from fedsim.compression import decompress
from fedsim.errors import UpdateRejected
from fedsim.lora_ranks import pad_adapter, truncate_adapter
from fedsim.protocol import ClientUpload

TensorDict = dict[str, torch.Tensor]

DELTA_LIMIT_EXP = 12
"""Updates whose delta from the global adapter reaches 2**12 in any element are rejected; the
bound fixes the fixed-point scale (values this large mean a diverged client, not a LoRA update)."""


def _check_keys_and_shapes(update: TensorDict, reference: TensorDict) -> None:
    missing = reference.keys() - update.keys()
    extra = update.keys() - reference.keys()
    if missing or extra:
        raise UpdateRejected(
            f"keys differ from the global adapter (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]})"
        )
    for key, ref in reference.items():
        value = update[key]
        if value.shape != ref.shape:
            raise UpdateRejected(f"{key}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}")


def check_structure(update: TensorDict, reference: TensorDict) -> None:
    """Raise UpdateRejected unless `update` has the reference's keys, shapes and dtypes."""
    _check_keys_and_shapes(update, reference)
    for key, ref in reference.items():
        if update[key].dtype != ref.dtype:
            raise UpdateRejected(f"{key}: dtype {update[key].dtype}, expected {ref.dtype}")


def _check_delta(key: str, delta: torch.Tensor) -> None:
    """Reject non-finite values and deltas beyond the fixed-point range (NaN fails both tests)."""
    low, high = torch.aminmax(delta)
    limit = 2.0**DELTA_LIMIT_EXP
    if -limit < low.item() and high.item() < limit:
        return
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise UpdateRejected(f"{key}: non-finite values")
    raise UpdateRejected(f"{key}: delta from the global adapter reaches 2**{DELTA_LIMIT_EXP}")


def check_update(update: TensorDict, reference: TensorDict) -> None:
    """Raise UpdateRejected unless `update` has the reference's keys, shapes, dtypes, finite values
    and deltas within the representable range."""
    check_structure(update, reference)
    for key, ref in reference.items():
        _check_delta(key, update[key].double() - ref.double())


def check_delta(delta: TensorDict, reference: TensorDict) -> None:
    """Raise UpdateRejected unless `delta` (an update minus the global adapter, as decoded from a
    possibly compressed or lower-rank upload) has the reference's keys and shapes, finite values,
    and stays below 2**DELTA_LIMIT_EXP in every element."""
    _check_keys_and_shapes(delta, reference)
    for key, value in delta.items():
        if value.numel():
            _check_delta(key, value)


def l2_norm(delta: TensorDict) -> float:
    """The L2 norm of a whole update (all its tensors as one vector)."""
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in delta.values()))


def clip_delta(delta: TensorDict, max_norm: float) -> tuple[TensorDict, float]:
    """Scale `delta` down to L2 norm `max_norm` if it is longer; returns (delta, original norm)."""
    norm = l2_norm(delta)
    if norm <= max_norm:
        return delta, norm
    factor = max_norm / norm
    return {k: v * factor for k, v in delta.items()}, norm


FOLD_CHUNK = 1 << 16
"""Elements folded at a time (512 KiB of float64): temporaries stay in the CPU's L2 cache, and a
chunk is large enough for torch to split each op over two threads (its grain is 32,768); 1.5x
the fold throughput of 1 << 15 and of 1 << 17 in benchmarks/aggregation.py on 2 cores."""


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
        """Fold one client's adapter in with an integer weight (its sample count, or 1).

        Raises UpdateRejected (and leaves the sum as it was) for a malformed update."""
        if weight < 1 or self.total_weight + weight > self.max_total_weight:
            raise ValueError(f"weight {weight} exceeds the round's bound {self.max_total_weight}")
        check_structure(update, self.reference)
        scale = float(weight) * 2.0**self.shift
        folded: list[str] = []
        try:
            for key in self._acc:
                self._fold(key, update[key], scale, sign=1)
                folded.append(key)
        except UpdateRejected:
            for key in folded:  # integer sums undo exactly
                self._fold(key, update[key], scale, sign=-1)
            raise
        self.total_weight += weight
        self.count += 1

    def _fold(self, key: str, value: torch.Tensor, scale: float, sign: int) -> None:
        # In cache-sized chunks, so that the float64 and int64 temporaries never reach memory.
        flat = value.reshape(-1)
        for lo in range(0, flat.numel(), FOLD_CHUNK):
            try:
                self._fold_chunk(key, flat, lo, scale, sign)
            except UpdateRejected:
                for done in range(0, lo, FOLD_CHUNK):  # this tensor's chunks already added
                    self._fold_chunk(key, flat, done, scale, -sign)
                raise

    def _fold_chunk(self, key: str, flat: torch.Tensor, lo: int, scale: float, sign: int) -> None:
        hi = lo + FOLD_CHUNK
        delta = flat[lo:hi].to(torch.float64).sub_(self.reference[key].reshape(-1)[lo:hi])
        _check_delta(key, delta)
        self._acc[key].view(-1)[lo:hi].add_(delta.mul_(scale).round_().to(torch.int64), alpha=sign)

    def add_delta(self, delta: TensorDict, weight: int) -> None:
        """Fold in a float64 delta (decoded, possibly clipped) with an integer weight; checked
        with `check_delta` first, so a rejected one leaves the sum as it was."""
        if weight < 1 or self.total_weight + weight > self.max_total_weight:
            raise ValueError(f"weight {weight} exceeds the round's bound {self.max_total_weight}")
        check_delta(delta, self.reference)
        scale = float(weight) * 2.0**self.shift
        for key, acc in self._acc.items():
            acc += torch.round(delta[key].double() * scale).to(torch.int64)
        self.total_weight += weight
        self.count += 1

    def mean(self, denominator: int | None = None) -> TensorDict:
        """The weighted mean delta over what was added, as float64 tensors; `denominator`
        replaces the total weight added (DP-FedAvg's fixed weights)."""
        if self.count == 0:
            raise ValueError("no update was added")
        scale = 2.0**-self.shift / (denominator or self.total_weight)
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


def decode_upload(
    upload: ClientUpload, global_adapter: TensorDict, block_size: int | None = None
) -> TensorDict:
    """The full-rank float64 delta `upload` stands for; raises UpdateRejected when malformed."""
    if upload.rank is not None:
        full = _full_rank(global_adapter)
        if not 1 <= upload.rank <= full:
            raise UpdateRejected(f"LoRA rank {upload.rank} outside 1..{full}")
    reference = (
        truncate_adapter(global_adapter, upload.rank) if upload.rank is not None else global_adapter
    )
    if upload.encoding == "raw":
        check_update(upload.tensors, reference)
        local = {k: v.double() for k, v in upload.tensors.items()}
    else:
        delta = decompress(upload.tensors, reference, upload.encoding, block_size)
        local = {k: reference[k].double() + d for k, d in delta.items()}
    if upload.rank is not None:
        local = pad_adapter(local, global_adapter)
    delta = {k: local[k] - g.double() for k, g in global_adapter.items()}
    check_delta(delta, global_adapter)
    return delta


def _full_rank(adapter: TensorDict) -> int:
    for key, value in adapter.items():
        if "lora_A" in key:
            return value.shape[0]
    return 0
