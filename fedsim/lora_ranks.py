"""Heterogeneous LoRA ranks by zero-padding (HetLoRA, Cho et al. 2024).

The global adapter has rank r. A client of rank r_i < r trains only the first r_i components (rows
of every `lora_A`, columns of every `lora_B`) at the global scaling alpha/r, so its adapter is
exactly the rank-r_i truncation of a rank-r one; it uploads just those components. The server pads
the client's adapter back to rank r with zeros and averages as usual, so the components a client
does not train count as zero in its contribution, and higher components shrink by the share of
the round's weight that comes from lower-rank clients (HetLoRA's zero-padding aggregation).
"""

from __future__ import annotations

import torch

TensorDict = dict[str, torch.Tensor]


def rank_axis(key: str) -> int | None:
    """The axis of a LoRA tensor that indexes its rank components: 0 for `lora_A` (r x in),
    1 for `lora_B` (out x r); None for a tensor without one."""
    if "lora_A" in key:
        return 0
    if "lora_B" in key:
        return 1
    return None


def truncate_adapter(adapter: TensorDict, rank: int) -> TensorDict:
    """The first `rank` components of every LoRA tensor (other tensors unchanged)."""
    out = {}
    for key, value in adapter.items():
        axis = rank_axis(key)
        out[key] = value if axis is None else value.narrow(axis, 0, rank).contiguous()
    return out


def pad_adapter(adapter: TensorDict, reference: TensorDict) -> TensorDict:
    """Zero-pad a truncated adapter to the shapes of `reference` (the global adapter)."""
    out = {}
    for key, ref in reference.items():
        value, axis = adapter[key], rank_axis(key)
        if axis is None or value.shape == ref.shape:
            out[key] = value
            continue
        full = torch.zeros(ref.shape, dtype=value.dtype)
        full.narrow(axis, 0, value.shape[axis]).copy_(value)
        out[key] = full
    return out


def rank_mask(key: str, shape: torch.Size, rank: int) -> torch.Tensor | None:
    """1 where a rank-`rank` client may train, 0 elsewhere; None when the whole tensor is
    trainable."""
    axis = rank_axis(key)
    if axis is None or shape[axis] <= rank:
        return None
    mask = torch.zeros(shape)
    mask.narrow(axis, 0, rank).fill_(1.0)
    return mask


BASE_DELTA_PREFIX = "base_delta/"
"""FLoRA: keys `base_delta/<base weight name>` (in server_state.safetensors, and in an adapter as
`fedsim eval` loads a round) hold the delta merged into that base weight."""


def base_weight_name(adapter_key: str) -> str:
    """The base model's name of the weight a LoRA tensor adapts: PEFT's saved key
    `base_model.model.<module>.lora_A.weight` -> `<module>.weight` (a name of the base model
    alone, as `AutoModelForCausalLM.from_pretrained` has it)."""
    module = adapter_key.split(".lora_A.")[0].split(".lora_B.")[0]
    return module.removeprefix("base_model.model.") + ".weight"
