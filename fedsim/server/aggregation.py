"""Update checks and the exact, order-independent streaming weighted mean of client deltas.

Workers finish in any order, and floating-point addition is not associative, so a running float
sum would make the global adapter depend on scheduling. `WeightedDeltaSum` instead rounds each
weighted term `n_i * (x_i - g)` once onto a fixed-point grid and adds the terms as int64: integer
addition is exact and commutative, so every arrival order gives the same bits, while memory stays
at one accumulator per tensor however many clients a round has.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
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
"""Elements whose delta is checked together when an update is rejected: an update with several bad
values (non-finite ones, ones beyond the range) gets the error of the first chunk holding one, in
the reference's key order, as it always has."""

FOLD_BLOCK = 1 << 16
"""Elements folded at a time, into one reused float64 buffer: a 7B adapter's LoRA factors (65,536
elements each) are one block per tensor. Per client of that adapter (benchmarks/aggregation.py
--cluster), in CPU time on one core: 17.5 ms at 1 << 16, 19.6 at 1 << 15, 21 at 1 << 14 (fewer calls
outweigh the block's slices spilling from the L2 cache into L3)."""

_MAGIC = 1.5 * 2.0**52
"""For a float64 |x| < 2**51, x + _MAGIC lies in [2**52, 2**53], where the float64 grid is the
integers: the addition rounds x half to even (as torch.round and numpy.rint do), and the sum's bits
minus _MAGIC's are that integer as int64. One add and one integer subtract replace a round and a
float-to-int conversion, the two slowest steps of the fold."""
_MAGIC_BITS = np.float64(_MAGIC).view(np.int64)
_MAGIC_RANGE = 2.0**51


def _flat_array(tensor: torch.Tensor) -> np.ndarray:
    """`tensor`'s values as a flat numpy array (a view where it can be), exactly: dtypes numpy
    lacks (bfloat16) widen to float64, which holds every one of their values."""
    flat = tensor.detach().cpu().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64, torch.float16):
        flat = flat.to(torch.float64)
    return flat.numpy()


def _fold_block(
    update: np.ndarray,
    reference: np.ndarray,
    acc: np.ndarray,
    scale: float,
    sign: int,
    buf: np.ndarray,
) -> bool:
    """acc += sign * round(float64(update - reference) * scale), element by element, rounding half
    to even: the bits of `torch.round` on the same float64 product. Returns False, adding nothing,
    when a delta is not finite or reaches 2**DELTA_LIMIT_EXP."""
    limit = 2.0**DELTA_LIMIT_EXP
    x = buf[: len(update)]
    np.copyto(x, update)  # then subtract: faster than numpy's mixed-dtype subtract
    np.subtract(x, reference, out=x)
    np.multiply(x, scale, out=x)
    # |x| < limit * scale implies |delta| < limit (limit is a power of two, so limit * scale is
    # exact, and rounding is monotone); NaN fails both comparisons
    bound = min(limit * scale, _MAGIC_RANGE)
    if -bound < x.min() and x.max() < bound:
        ints = np.add(x, _MAGIC, out=x).view(np.int64)
        np.subtract(ints, _MAGIC_BITS, out=ints)
    else:  # a delta near the range's edge, or a rejected one: today's arithmetic, step by step
        delta = np.subtract(update, reference, dtype=np.float64)
        if not (-limit < delta.min() and delta.max() < limit):
            return False
        ints = np.rint(np.multiply(delta, scale, out=delta), out=delta).astype(np.int64)
    if sign > 0:
        np.add(acc, ints, out=acc)
    else:
        np.subtract(acc, ints, out=acc)
    return True


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    # one pool per thread count for the process's lifetime: rounds come and go, threads stay
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fedsim-fold")


Block = tuple[str, int, int]


class WeightedDeltaSum:
    """Streaming weighted mean of `update - reference`, bitwise independent of the order of `add`.

    `max_total_weight` bounds the sum of weights that may be added (for a round, the sample count
    of its selected clients); it fixes the fixed-point scale so that the int64 sum cannot overflow:
    |sum| <= W * 2**DELTA_LIMIT_EXP * 2**shift < 2**62. The mean's resolution is then
    2**-(62 - DELTA_LIMIT_EXP) = 2**-50, finer than float32 carries for any value above ~1e-7.

    `threads` > 1 shards each `add` over that many threads by element ranges (numpy releases the
    GIL in its loops). Every element's integer term is the same whichever thread computes it, and
    integer addition is exact, so the sums do not depend on the thread count either.

    Memory: the int64 accumulator and a float64 copy of `reference`, 4x a float32 adapter's bytes;
    `reference` is read once, by the first `add`, so it must not change in place after that.
    """

    def __init__(self, reference: TensorDict, max_total_weight: int, threads: int = 1) -> None:
        if max_total_weight < 1:
            raise ValueError("max_total_weight must be >= 1")
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.reference = reference
        self.max_total_weight = max_total_weight
        self.threads = threads
        self.shift = 62 - DELTA_LIMIT_EXP - math.ceil(math.log2(max_total_weight))
        self.total_weight = 0
        self.count = 0
        self._acc = {k: torch.zeros(v.shape, dtype=torch.int64) for k, v in reference.items()}
        self._acc_flat = {k: acc.numpy().reshape(-1) for k, acc in self._acc.items()}
        self._ref_flat: dict[str, np.ndarray] = {}  # float64, made by the first `add`
        self._blocks: list[Block] = [
            (k, lo, min(lo + FOLD_BLOCK, acc.size))
            for k, acc in self._acc_flat.items()
            for lo in range(0, acc.size, FOLD_BLOCK)
        ]

    def add(self, update: TensorDict, weight: int) -> None:
        """Fold one client's adapter in with an integer weight (its sample count, or 1).

        Raises UpdateRejected (and leaves the sum as it was) for a malformed update."""
        if weight < 1 or self.total_weight + weight > self.max_total_weight:
            raise ValueError(f"weight {weight} exceeds the round's bound {self.max_total_weight}")
        check_structure(update, self.reference)
        scale = float(weight) * 2.0**self.shift
        if not self._ref_flat:  # float64 once a round, not once a client: the widest step halves
            self._ref_flat = {
                k: v.detach().cpu().reshape(-1).to(torch.float64).numpy()
                for k, v in self.reference.items()
            }
        flat = {k: _flat_array(update[k]) for k in self._acc}
        rejected = threading.Event()
        blocks = iter(self._blocks)  # shared by the threads: each next() hands out one block
        if self.threads == 1:
            done = self._fold_blocks(blocks, flat, scale, rejected)
        else:
            shards = [
                _pool(self.threads).submit(self._fold_blocks, blocks, flat, scale, rejected)
                for _ in range(self.threads)
            ]
            wait(shards)  # all of them, even when one fails: none may write after add returns
            done = [block for shard in shards for block in shard.result()]
        if rejected.is_set():
            buf = np.empty(FOLD_BLOCK)
            for key, lo, hi in done:  # integer sums undo exactly
                ref, acc = self._ref_flat[key], self._acc_flat[key]
                _fold_block(flat[key][lo:hi], ref[lo:hi], acc[lo:hi], scale, -1, buf)
            self._raise_first_rejection(update)
        self.total_weight += weight
        self.count += 1

    def _fold_blocks(
        self,
        blocks: Iterator[Block],
        flat: dict[str, np.ndarray],
        scale: float,
        rejected: threading.Event,
    ) -> list[Block]:
        """Fold blocks from `blocks` until it runs out or some block is rejected; the ones added."""
        buf = np.empty(FOLD_BLOCK)
        done: list[Block] = []
        with np.errstate(all="ignore"):  # NaN and infinity are rejected, not warned about
            for key, lo, hi in blocks:
                if rejected.is_set():
                    break
                ref, acc = self._ref_flat[key], self._acc_flat[key]
                if not _fold_block(flat[key][lo:hi], ref[lo:hi], acc[lo:hi], scale, 1, buf):
                    rejected.set()
                    break
                done.append((key, lo, hi))
        return done

    def _raise_first_rejection(self, update: TensorDict) -> None:
        """Raise the error the first bad chunk of `update` gets, in key and FOLD_CHUNK order."""
        for key, ref in self.reference.items():
            value, ref_flat = update[key].reshape(-1), ref.reshape(-1)
            for lo in range(0, value.numel(), FOLD_CHUNK):
                hi = lo + FOLD_CHUNK
                _check_delta(key, value[lo:hi].to(torch.float64).sub_(ref_flat[lo:hi]))
        raise AssertionError("a block of the update was rejected but no chunk of it fails")

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
