"""Uplink compression by hand on small tensors, and malformed payloads rejected."""

import pytest
import torch

from fedsim.compression import compress, decompress, dequantize_int8, quantize_int8, topk_entries
from fedsim.errors import UpdateRejected
from fedsim.protocol import ClientUpload, encode_upload
from fedsim.server.aggregation import decode_upload

X = torch.tensor([0.5, -1.0, 0.25, 0.0])


def test_int8_per_tensor_scale():
    q, scales = quantize_int8(X, None)
    # s = 1/127; 0.5*127 = 63.5 rounds to 64 (half to even), 0.25*127 = 31.75 to 32
    assert q.tolist() == [64, -127, 32, 0] and q.dtype == torch.int8
    assert scales.tolist() == pytest.approx([1 / 127])
    back = dequantize_int8(q, scales, 4, None)
    assert back.tolist() == pytest.approx([64 / 127, -1, 32 / 127, 0])


def test_int8_per_block_scale():
    q, scales = quantize_int8(X, 2)  # blocks [0.5, -1] and [0.25, 0]
    assert q.tolist() == [64, -127, 127, 0]
    assert scales.tolist() == pytest.approx([1 / 127, 0.25 / 127])
    back = dequantize_int8(q, scales, 4, 2)
    assert back.tolist() == pytest.approx([64 / 127, -1.0, 0.25, 0.0])
    q3, s3 = quantize_int8(torch.tensor([1.0, 2.0, 3.0]), 2)  # a short last block
    assert q3.numel() == 3 and s3.numel() == 2
    assert dequantize_int8(q3, s3, 3, 2).tolist() == pytest.approx([1.0, 2.0, 3.0], abs=0.02)


def test_topk_keeps_the_largest_magnitudes():
    idx, val = topk_entries(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5)
    assert idx.tolist() == [1, 2] and val.tolist() == [-3.0, 2.0]
    payload = compress({"w": torch.tensor([[0.1, -3.0], [2.0, 0.5]])}, "topk", topk_fraction=0.5)
    back = decompress(payload, {"w": torch.zeros(2, 2)}, "topk")
    assert back["w"].tolist() == [[0.0, -3.0], [2.0, 0.0]]


@pytest.mark.parametrize(("kind", "bytes_per_value"), [("fp16", 2), ("bf16", 2), ("int8", 1)])
def test_round_trip_error_and_size(kind, bytes_per_value):
    gen = torch.Generator().manual_seed(0)
    delta = {"a": torch.randn(64, 32, generator=gen) * 0.01, "b": torch.randn(8, generator=gen)}
    payload = compress(delta, kind, block_size=64)
    back = decompress(payload, delta, kind, block_size=64)
    for k, v in delta.items():
        err = (back[k] - v.double()).abs().max() / v.abs().max()
        assert err < {"fp16": 1e-3, "bf16": 1e-2, "int8": 1e-2}[kind]
    values = sum(v.numel() for v in delta.values())
    size = sum(t.numel() * t.element_size() for t in payload.values())
    scales = (32 + 1) * 4 if kind == "int8" else 0  # 2048/64 blocks of a, one of b
    assert size == values * bytes_per_value + scales


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"w": torch.zeros(4, dtype=torch.int8)}, "w::scale: missing"),
        ({"w": torch.zeros(4, dtype=torch.int16), "w::scale": torch.ones(1)}, "dtype"),
        ({"w": torch.zeros(3, dtype=torch.int8), "w::scale": torch.ones(1)}, "3 values"),
        (
            {"w": torch.zeros(4, dtype=torch.int8), "w::scale": torch.ones(1), "x": torch.ones(1)},
            "unexpected",
        ),
    ],
)
def test_malformed_int8_payload_is_rejected(payload, reason):
    with pytest.raises(UpdateRejected, match=reason):
        decompress(payload, {"w": torch.zeros(4)}, "int8")


def test_topk_index_out_of_range_is_rejected():
    payload = {"w::idx": torch.tensor([7], dtype=torch.int32), "w::val": torch.ones(1)}
    with pytest.raises(UpdateRejected, match="outside"):
        decompress(payload, {"w": torch.zeros(4)}, "topk")


def test_upload_round_trip_and_bytes():
    g = {"lora_A.weight": torch.ones(4, 8), "lora_B.weight": torch.zeros(8, 4)}
    local = {"lora_A.weight": g["lora_A.weight"] + 0.5, "lora_B.weight": g["lora_B.weight"] - 0.25}
    raw = encode_upload(local, g)
    assert raw.encoding == "raw" and raw.nbytes() == 64 * 4
    assert decode_upload(raw, g)["lora_A.weight"].tolist() == [[0.5] * 8] * 4
    int8 = encode_upload(local, g, "int8")
    assert int8.nbytes() == 64 + 2 * 4
    delta = decode_upload(int8, g)
    assert delta["lora_B.weight"].flatten().tolist() == pytest.approx([-0.25] * 32)


def test_fp16_overflow_is_rejected_as_non_finite():
    g = {"w": torch.zeros(2)}
    upload = ClientUpload({"w": torch.tensor([1e5, 0.0]).half()}, "fp16")
    with pytest.raises(UpdateRejected, match="non-finite"):
        decode_upload(upload, g)
