"""What a client sends to the aggregator, and how the aggregator reads it back.

`encode_upload` (on the worker) turns a client's trained adapter into a `ClientUpload`: the
adapter itself ("raw", the default, so plain FedAvg averages exactly what was trained), or its
delta from the global adapter compressed for the uplink (`compression.py`), in both cases only the
LoRA components a lower-rank client trained (`lora_ranks.py`). `decode_upload` (on the
aggregator) validates and reverses that into a full-rank float64 delta ready to be averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedsim.compression import compress, decompress
from fedsim.errors import UpdateRejected
from fedsim.lora_ranks import pad_adapter, truncate_adapter
from fedsim.server.aggregation import check_delta, check_update

TensorDict = dict[str, torch.Tensor]


def tensors_nbytes(tensors: TensorDict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class ClientUpload:
    """One client's upload: its update and, for stateful strategies, its new client state."""

    tensors: TensorDict
    encoding: str = "raw"
    """raw (the trained adapter) or the compression kind of a delta (fp16, bf16, int8, topk)."""
    rank: int | None = None
    """LoRA rank the client trained (None: the global rank)."""
    client_state: TensorDict = field(default_factory=dict)
    """SCAFFOLD: the client's new control variate."""

    def nbytes(self) -> int:
        """Bytes sent on the uplink: the update's tensors and the client state."""
        return tensors_nbytes(self.tensors) + tensors_nbytes(self.client_state)


def encode_upload(
    local: TensorDict,
    global_adapter: TensorDict,
    compression: str = "none",
    block_size: int | None = None,
    topk_fraction: float = 0.1,
    rank: int | None = None,
) -> ClientUpload:
    """The upload of a client whose trained adapter is `local`."""
    if rank is not None:
        local, global_adapter = (
            truncate_adapter(local, rank),
            truncate_adapter(global_adapter, rank),
        )
    if compression == "none":
        return ClientUpload(local, "raw", rank)
    delta = {k: local[k].double() - g.double() for k, g in global_adapter.items()}
    return ClientUpload(compress(delta, compression, block_size, topk_fraction), compression, rank)


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
