"""LoRA-native aggregation: the arithmetic of FLoRA, FlexLoRA, FFA-LoRA and FedSA-LoRA.

A LoRA adapter stands for the weight update dW = s * B @ A (s = alpha / r). Averaging the factors
is not averaging the updates: mean(B) @ mean(A) != mean(B @ A). The methods here aggregate what
the factors stand for, or arrange training so that averaging the factors is exact:

- FLoRA (Wang et al. 2024) stacks the clients' factors along the rank dimension, A's rows scaled
  by each client's weight (and scaling): B_stack @ A_stack = sum_i p_i s_i B_i @ A_i, exactly,
  for any mix of ranks (`flora_stack`).
- FlexLoRA (Bai et al. 2024) forms that sum per target matrix and hands each client the rank-r_i
  truncated SVD of it (`flexlora_factors`).
- FFA-LoRA (Sun et al. 2024) freezes A at its shared seeded initialisation, so
  mean(B_i) @ A = mean(B_i @ A) and the plain average of B is exact (the strategy: `FFALoRA`).
- FedSA-LoRA (Guo et al. 2025) averages A and keeps each client's B (`split_lora`; `FedSALoRA`).

Everything here is a pure function on tensors keyed by PEFT adapter names (`...lora_A.weight`,
`...lora_B.weight`), unit-tested against the closed forms in
tests/server/test_lora_native_aggregation.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TensorDict = dict[str, torch.Tensor]

LORA_A, LORA_B = "lora_A", "lora_B"


def is_lora_a(key: str) -> bool:
    return f".{LORA_A}." in key or key.startswith(f"{LORA_A}.")


def is_lora_b(key: str) -> bool:
    return f".{LORA_B}." in key or key.startswith(f"{LORA_B}.")


def split_lora(adapter: TensorDict) -> tuple[TensorDict, TensorDict]:
    """(the lora_A tensors, everything else) of an adapter; FedSA-LoRA shares the first and keeps
    the second (the B factors) on each client, FFA-LoRA freezes the first."""
    a = {k: v for k, v in adapter.items() if is_lora_a(k)}
    rest = {k: v for k, v in adapter.items() if not is_lora_a(k)}
    return a, rest


def lora_pairs(adapter: TensorDict) -> dict[str, tuple[str, str]]:
    """Target module -> (its lora_A key, its lora_B key), for every module with both factors."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in adapter:
        if is_lora_a(key):
            module = key.split(f".{LORA_A}.")[0] if f".{LORA_A}." in key else ""
            b_key = key.replace(LORA_A, LORA_B, 1)
            if b_key in adapter:
                pairs[module] = (key, b_key)
    return dict(sorted(pairs.items()))


@dataclass(frozen=True)
class ClientFactors:
    """One client's factors of one target matrix: A (r_i x in), B (out x r_i), its weight p_i
    in the round's average (the weights sum to 1) and its LoRA scaling s_i = alpha / r_i."""

    a: torch.Tensor
    b: torch.Tensor
    weight: float
    scaling: float = 1.0


def weighted_product(clients: Sequence[ClientFactors]) -> torch.Tensor:
    """The closed form: sum_i p_i * s_i * B_i @ A_i, in float64 (out x in)."""
    total = torch.zeros(clients[0].b.shape[0], clients[0].a.shape[1], dtype=torch.float64)
    for c in clients:
        total += (c.weight * c.scaling) * (c.b.double() @ c.a.double())
    return total


def flora_stack(clients: Sequence[ClientFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking: (A_stack, B_stack) of rank sum_i r_i, with A_stack = [p_1 s_1 A_1; ...]
    (rows) and B_stack = [B_1, ..., B_n] (columns), so that B_stack @ A_stack equals
    `weighted_product(clients)`: the i-th block of the rank sum is p_i s_i B_i @ A_i. Ranks may
    differ between clients; the result is float64 and carries no further scaling."""
    a = torch.cat([(c.weight * c.scaling) * c.a.double() for c in clients], dim=0)
    b = torch.cat([c.b.double() for c in clients], dim=1)
    return a, b


def flora_merged_delta(clients: Sequence[ClientFactors]) -> torch.Tensor:
    """The weight delta FLoRA merges into the base matrix: B_stack @ A_stack (float64)."""
    a, b = flora_stack(clients)
    return b @ a


def flexlora_factors(
    delta_w: torch.Tensor, rank: int, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexLoRA's redistribution: the rank-`rank` truncated SVD of `delta_w` = U S V^T as LoRA
    factors (A: rank x in, B: out x rank, float64) with scaling * B @ A = U_r S_r V_r^T, the best
    rank-r approximation of `delta_w` (Eckart-Young). The singular values are split evenly,
    B = U_r sqrt(S_r / s) and A = sqrt(S_r / s) V_r^T, so neither factor's scale dwarfs the other's
    (FlexLoRA's paper puts S on B; the product, which is all the model sees, is the same).
    A rank above min(out, in) is padded with zero components."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    u, s, vh = torch.linalg.svd(delta_w.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = (s[:k] / scaling).sqrt()
    b = torch.zeros(delta_w.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta_w.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return a, b


def flexlora_round(
    clients: Sequence[ClientFactors], ranks: Sequence[int], scalings: Sequence[float]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One FlexLoRA aggregation of one target matrix: sum_i p_i s_i B_i A_i, then each client j's
    factors of rank `ranks[j]` at scaling `scalings[j]` (its truncated SVD)."""
    delta = weighted_product(clients)
    return [flexlora_factors(delta, r, s) for r, s in zip(ranks, scalings, strict=True)]
