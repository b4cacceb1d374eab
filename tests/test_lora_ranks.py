"""Heterogeneous LoRA ranks (HetLoRA zero-padding) on hand-made tensors."""

import pytest
import torch

from fedsim.errors import UpdateRejected
from fedsim.lora_ranks import pad_adapter, rank_mask, truncate_adapter
from fedsim.protocol import encode_upload
from fedsim.server.aggregation import WeightedDeltaSum, decode_upload

A, B = "q_proj.lora_A.weight", "q_proj.lora_B.weight"
# rank 3: A is 3 x 2 (component j = row j), B is 2 x 3 (component j = column j)
G = {
    A: torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]),
    B: torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
}


def test_truncate_and_pad():
    t = truncate_adapter(G, 1)
    assert t[A].tolist() == [[1.0, 1.0]] and t[B].tolist() == [[1.0], [4.0]]
    p = pad_adapter(t, G)
    assert p[A].tolist() == [[1, 1], [0, 0], [0, 0]] and p[B].tolist() == [[1, 0, 0], [4, 0, 0]]
    assert truncate_adapter(G, 3)[A].tolist() == G[A].tolist()


def test_rank_mask():
    assert rank_mask(A, G[A].shape, 2).tolist() == [[1, 1], [1, 1], [0, 0]]
    assert rank_mask(B, G[B].shape, 1).tolist() == [[1, 0, 0], [1, 0, 0]]
    assert rank_mask(A, G[A].shape, 3) is None and rank_mask("bias", torch.Size([3]), 1) is None


def test_rank_one_client_contributes_its_component_and_zeros():
    """A rank-1 client trained component 0 to A=[1.5, 1.5], B=[2, 5]: the server pads it, so its
    delta pulls components 1 and 2 to zero."""
    local = {k: v.clone() for k, v in G.items()}
    local[A][0] = 1.5
    local[B][0, 0] = 2.0
    upload = encode_upload(local, G, rank=1)
    assert upload.rank == 1 and upload.tensors[A].shape == (1, 2)
    assert upload.nbytes() == (2 + 2) * 4  # one row of A, one column of B
    delta = decode_upload(upload, G)
    assert delta[A].tolist() == [[0.5, 0.5], [-2, -2], [-3, -3]]
    assert delta[B].tolist() == [[1, -2, -3], [0, -5, -6]]


def test_mixed_ranks_average_into_the_global_rank():
    """Clients of rank 3 (weight 1) and rank 1 (weight 1) sending the global back unchanged: the
    mean keeps component 0 and halves components 1 and 2 (HetLoRA's zero-padding)."""
    acc = WeightedDeltaSum(G, 2)
    for rank in (3, 1):
        acc.add_delta(decode_upload(encode_upload(G, G, rank=rank), G), 1)
    new = {k: G[k].double() + d for k, d in acc.mean().items()}
    assert new[A].tolist() == [[1, 1], [1, 1], [1.5, 1.5]]
    assert new[B].tolist() == [[1, 1, 1.5], [4, 2.5, 3]]


def test_compressed_low_rank_upload():
    local = {k: v + 0.25 for k, v in G.items()}
    upload = encode_upload(local, G, "fp16", rank=2)
    delta = decode_upload(upload, G)
    assert delta[A][:2].tolist() == [[0.25, 0.25]] * 2 and delta[A][2].tolist() == [-3, -3]


def test_rank_beyond_the_global_is_rejected():
    upload = encode_upload(G, G, rank=3)
    upload.rank = 4
    with pytest.raises(UpdateRejected, match=r"rank 4 outside 1\.\.3"):
        decode_upload(upload, G)
