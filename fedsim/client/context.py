"""What a server strategy or the client's profile changes about local training, written once for
every backend: FedProx's proximal term, SCAFFOLD's correction step, the rank masks of
heterogeneous LoRA ranks and FFA-LoRA's frozen A. The loop in `fedsim.client.trainer` applies
them; a backend only supplies the parameters and a way to rewrite its weights
(`Trainer.update_weights`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedsim.lora_ranks import rank_axis, rank_mask

TensorDict = dict[str, torch.Tensor]
WeightUpdate = Callable[[str, torch.Tensor], torch.Tensor]
"""`update(key, weight) -> new weight`, applied by a backend to every LoRA parameter."""


class ProximalTerm:
    """FedProx's (mu/2)*||w - anchor||^2, the anchor being the weights as training starts (the
    global adapter, after any rank mask, so the term never pulls on components a client does not
    own).

    It reaches the gradient once per optimizer step, in one of two equivalent forms: `add_gradient`
    for a backend whose accumulated gradients the loop can touch before clipping, `loss` for an
    engine that keeps them to itself (added to each micro-batch's loss, which the engine averages
    back to once per step). Each form is what that backend has always computed, bit for bit.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], mu: float) -> None:
        self.params, self.mu = params, mu
        self.anchors = {k: p.detach().clone() for k, p in params.items()}

    def loss(self) -> torch.Tensor:
        """The term itself, in fp32 whatever the parameters' dtype."""
        return (
            0.5
            * self.mu
            * sum(
                ((p.float() - self.anchors[k].float()) ** 2).sum() for k, p in self.params.items()
            )
        )

    def add_gradient(self) -> None:
        """Add the term's gradient, mu*(w - anchor), to each parameter's gradient (in the
        parameter's dtype)."""
        with torch.no_grad():
            for key, p in self.params.items():
                prox = self.mu * (p - self.anchors[key])
                if p.grad is None:
                    p.grad = prox
                else:
                    p.grad.add_(prox)


def rank_masks(params: dict[str, torch.nn.Parameter], rank: int | None) -> TensorDict:
    """Heterogeneous ranks: per parameter, 1 where a rank-`rank` client trains, else 0 (only the
    parameters it does not own entirely; none when `rank` is None)."""
    if rank is None:
        return {}
    masks = {}
    for key, p in params.items():
        mask = rank_mask(key, p.shape, rank)
        if mask is not None:
            masks[key] = mask.to(p.device)
    return masks


def masked(masks: TensorDict) -> WeightUpdate:
    """Zero the LoRA components a lower-rank client does not own (0/1 masks: exact in any
    dtype)."""
    return lambda key, w: w * masks[key] if key in masks else w


def frozen_lora_a(params: dict[str, torch.nn.Parameter]) -> TensorDict:
    """FFA-LoRA: the starting value of every `lora_A` parameter, to hold it at."""
    return {k: p.detach().clone() for k, p in params.items() if rank_axis(k) == 0}


def zero_gradients_of(params: dict[str, torch.nn.Parameter], keys: list[str]) -> list[Any]:
    """Hooks that zero the gradient of each parameter in `keys` as autograd computes it, before
    any backend accumulates, clips or steps it: a frozen A then adds nothing to the clipped
    gradient norm, on every backend. Remove them with `.remove()`."""
    return [params[k].register_hook(torch.zeros_like) for k in keys]


def held(anchors: TensorDict) -> WeightUpdate:
    """Put the parameters in `anchors` back to their anchored values (AdamW's decoupled weight
    decay still shrinks a weight whose gradient is zero)."""
    return lambda key, w: anchors[key].to(w.device, w.dtype) if key in anchors else w


def corrected(correction: TensorDict, lr: float) -> WeightUpdate:
    """SCAFFOLD's drift correction as a separate step after the optimizer's: w <- w - lr*(c - c_i)
    (decoupled from AdamW's normalisation, as OpenFedLLM applies it)."""
    return lambda key, w: w - lr * correction[key].to(w.device, w.dtype)


def scaffold_client_variate(
    correction: TensorDict, global_adapter: TensorDict, local_adapter: TensorDict, lr_sum: float
) -> TensorDict:
    """A client's new control variate, option II: c_i+ = c_i - c + (x - y_i) / (K * lr).

    `correction` is c - c_i as the client got it; `lr_sum` is the sum of the learning rates of its
    K local steps (K * lr for a constant rate). Returned as float32.
    """
    return {
        k: (
            -correction[k].double()
            + (global_adapter[k].double() - local_adapter[k].double()) / lr_sum
        ).float()
        for k in global_adapter
    }
