"""Uplink compression of client deltas: fp16/bf16, int8 (per-tensor or per-block scale), top-k.

A client compresses `delta = local - global` (what the server needs) and the aggregator
decompresses it against the global adapter's shapes. Payloads are flat tensor dicts, so they
travel through Ray's object store like an adapter, and their size is what the round records as
uplink bytes. Decompression validates the payload (keys, dtypes, sizes, index ranges) and raises
`UpdateRejected` on anything malformed, so a bad upload is rejected like a bad update.

- fp16 / bf16: each tensor cast (2 bytes per value).
- int8: symmetric, round(x / s) in [-127, 127], s = max|x| / 127 over the whole tensor or over
  each block of `block_size` consecutive values (1 byte per value + 4 per scale).
- topk: the `ceil(fraction * n)` entries of largest magnitude as int32 indices + float32 values;
  the rest count as zero (no error feedback: what is not sent is lost).
"""

from __future__ import annotations

import math

import torch

from fedsim.errors import UpdateRejected

TensorDict = dict[str, torch.Tensor]
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _blocks(numel: int, block_size: int | None) -> int:
    return 1 if block_size is None else max(1, math.ceil(numel / block_size))


def quantize_int8(x: torch.Tensor, block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales) of a tensor, one scale per block (or per tensor)."""
    flat = x.double().flatten()
    n = flat.numel()
    size = n if block_size is None else block_size
    nblocks = _blocks(n, block_size)
    padded = torch.zeros(nblocks * max(size, 1), dtype=torch.float64)
    padded[:n] = flat
    rows = padded.view(nblocks, -1)
    peak = rows.abs().amax(dim=1)
    scales = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak)).float()
    q = torch.round(rows / scales.double().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q.flatten()[:n].clone(), scales


def dequantize_int8(
    q: torch.Tensor, scales: torch.Tensor, numel: int, block_size: int | None
) -> torch.Tensor:
    """The float64 values `quantize_int8` encoded (flat)."""
    size = numel if block_size is None else block_size
    index = torch.arange(numel) // max(size, 1)
    return q.double() * scales.double()[index]


def topk_entries(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ascending int32 flat indices, float32 values) of the largest-magnitude entries."""
    flat = x.flatten()
    k = max(1, math.ceil(fraction * flat.numel()))
    index = torch.topk(flat.abs().double(), k, sorted=False).indices.sort().values
    return index.to(torch.int32), flat[index].float()


def compress(
    delta: TensorDict, kind: str, block_size: int | None = None, topk_fraction: float = 0.1
) -> TensorDict:
    """Encode a client's delta as a flat tensor dict (`kind` other than none)."""
    out: TensorDict = {}
    for key, value in delta.items():
        if kind in _HALF:
            out[key] = value.to(_HALF[kind]).contiguous()
        elif kind == "int8":
            out[key], out[f"{key}::scale"] = quantize_int8(value, block_size)
        elif kind == "topk":
            out[f"{key}::idx"], out[f"{key}::val"] = topk_entries(value, topk_fraction)
        else:
            raise ValueError(f"unknown compression {kind!r}")
    return out


def _get(payload: TensorDict, key: str, dtype: torch.dtype, numel: int | None) -> torch.Tensor:
    value = payload.get(key)
    if value is None:
        raise UpdateRejected(f"{key}: missing from the compressed upload")
    if value.dtype != dtype:
        raise UpdateRejected(f"{key}: dtype {value.dtype}, expected {dtype}")
    if numel is not None and value.numel() != numel:
        raise UpdateRejected(f"{key}: {value.numel()} values, expected {numel}")
    return value


def decompress(
    payload: TensorDict, reference: TensorDict, kind: str, block_size: int | None = None
) -> TensorDict:
    """Decode `payload` into float64 deltas shaped like `reference`; raises UpdateRejected."""
    expected = set()
    out: TensorDict = {}
    for key, ref in reference.items():
        n = ref.numel()
        if kind in _HALF:
            expected.add(key)
            value = _get(payload, key, _HALF[kind], n)
            if value.shape != ref.shape:
                raise UpdateRejected(
                    f"{key}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
                )
            out[key] = value.double()
        elif kind == "int8":
            expected |= {key, f"{key}::scale"}
            q = _get(payload, key, torch.int8, n)
            scales = _get(payload, f"{key}::scale", torch.float32, _blocks(n, block_size))
            out[key] = dequantize_int8(q.flatten(), scales, n, block_size).view(ref.shape)
        elif kind == "topk":
            expected |= {f"{key}::idx", f"{key}::val"}
            index = _get(payload, f"{key}::idx", torch.int32, None).long()
            values = _get(payload, f"{key}::val", torch.float32, index.numel())
            if index.numel() and (index.min() < 0 or index.max() >= n):
                raise UpdateRejected(f"{key}::idx: index outside 0..{n - 1}")
            flat = torch.zeros(n, dtype=torch.float64)
            flat[index] = values.double()
            out[key] = flat.view(ref.shape)
        else:
            raise ValueError(f"unknown compression {kind!r}")
    extra = set(payload) - expected
    if extra:
        raise UpdateRejected(f"unexpected tensors in the compressed upload: {sorted(extra)[:3]}")
    return out
