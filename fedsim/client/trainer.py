"""Local trainers: one client's LoRA tuning on its shard.

A trainer backend is one small class behind `Trainer.train`; the worker hands it the model with
the global adapter already loaded, the client's tokenised examples and a seed, and gets back a
`TrainResult`. Everything random (batch order, dropout) derives from that seed, so a client's
update depends only on (global adapter, shard, seed), not on what the worker did before.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsim.model import get_adapter, set_adapter

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainSettings:
    """Local training hyperparameters (from `client.*` in the config)."""

    local_steps: int | None
    local_epochs: float | None
    batch_size: int
    micro_batch_size: int
    lr: float
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    pad_token_id: int = 0
    deepspeed: dict[str, Any] | None = None
    """`client.deepspeed`: DeepSpeed settings, read by the deepspeed backend only."""

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size

    def num_steps(self, num_examples: int) -> int:
        """Optimizer steps for a shard of `num_examples` records."""
        if self.local_steps is not None:
            return self.local_steps
        assert self.local_epochs is not None
        return max(1, math.ceil(self.local_epochs * num_examples / self.batch_size))


@dataclass
class TrainResult:
    """What one client's local training produced besides the adapter."""

    losses: list[float] = field(default_factory=list)
    """Mean loss of each optimizer step."""
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    lr_sum: float = 0.0
    """Sum of the learning rates of the optimizer steps taken (K * lr for a constant rate)."""

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


@dataclass(frozen=True)
class ClientContext:
    """What a server strategy or the client's profile changes about local training; the default
    changes nothing. Tensors are keyed by PEFT adapter names (`model.adapter_parameters`)."""

    prox_mu: float = 0.0
    """FedProx: adds (mu/2)*||w - w_global||^2 over the trainable parameters to each step's loss."""
    correction: dict[str, torch.Tensor] | None = None
    """SCAFFOLD: c - c_i; after every optimizer step w <- w - lr_t * (c - c_i)."""
    lora_rank: int | None = None
    """Heterogeneous ranks: train only the first `lora_rank` LoRA components (see lora_ranks)."""

    @property
    def is_plain(self) -> bool:
        """True when it changes nothing about local training."""
        return not self.prox_mu and self.correction is None and self.lora_rank is None


def add_proximal_gradient(
    params: dict[str, torch.nn.Parameter], anchors: dict[str, torch.Tensor], mu: float
) -> None:
    """Add the gradient of (mu/2)*||w - anchor||^2, i.e. mu*(w - anchor), to each parameter's
    gradient (once per optimizer step, before clipping: the same as adding the term to the loss)."""
    with torch.no_grad():
        for key, p in params.items():
            prox = mu * (p - anchors[key])
            if p.grad is None:
                p.grad = prox
            else:
                p.grad.add_(prox)


def apply_correction(
    params: dict[str, torch.nn.Parameter], correction: dict[str, torch.Tensor], lr: float
) -> None:
    """SCAFFOLD's drift correction as a separate step after the optimizer's: w <- w - lr*(c - c_i)
    (decoupled from AdamW's normalisation, as OpenFedLLM applies it)."""
    with torch.no_grad():
        for key, p in params.items():
            p.sub_(lr * correction[key].to(p.dtype))


def lr_factor(step: int, total: int, scheduler: str, warmup: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def batch_order(num_examples: int, num_items: int, rng: np.random.Generator) -> np.ndarray:
    """`num_items` example indices: whole shuffled passes over the shard, one after another."""
    passes = math.ceil(num_items / num_examples)
    return np.concatenate([rng.permutation(num_examples) for _ in range(passes)])[:num_items]


def collate(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padded positions get attention 0 and label -100."""
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_token_id, dtype=torch.long)
    lab = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, (x, y) in enumerate(zip(input_ids, labels, strict=True)):
        ids[row, : len(x)] = torch.as_tensor(x)
        lab[row, : len(y)] = torch.as_tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


def micro_batch(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    order: np.ndarray,
    step: int,
    micro: int,
    settings: TrainSettings,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Micro-batch `micro` of optimizer step `step`, collated onto `device`."""
    lo = step * settings.batch_size + micro * settings.micro_batch_size
    idx = order[lo : lo + settings.micro_batch_size]
    batch = collate([input_ids[i] for i in idx], [labels[i] for i in idx], settings.pad_token_id)
    return {k: v.to(device) for k, v in batch.items()}


class Trainer(ABC):
    """A local training backend.

    The worker calls `prepare` once with its model, then for each client `load_adapter`, `train`
    and `read_adapter`. The defaults move adapters straight in and out of the model's LoRA
    parameters; a backend that keeps its own copy of the weights (DeepSpeed's fp32 master copy)
    overrides them.
    """

    def __init__(self, settings: TrainSettings) -> None:
        self.settings = settings

    def prepare(self, model: torch.nn.Module) -> None:
        """Build whatever the backend keeps for the whole run (called once per worker); the
        torch backend keeps nothing."""
        return None

    def load_adapter(self, model: torch.nn.Module, adapter: dict[str, torch.Tensor]) -> None:
        """Make `adapter` (PEFT key names) the starting point of the next `train`."""
        set_adapter(model, adapter)

    def read_adapter(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The trained adapter: PEFT key names, contiguous CPU tensors."""
        return get_adapter(model)

    @abstractmethod
    def train(
        self,
        model: torch.nn.Module,
        input_ids: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        seed: int,
        context: ClientContext | None = None,
    ) -> TrainResult:
        """Tune the trainable (LoRA) parameters of `model` in place on the given examples,
        honouring `context` (FedProx term, SCAFFOLD correction, LoRA rank) when given."""


class TorchTrainer(Trainer):
    """Plain PyTorch: AdamW over the trainable parameters, micro-batches with gradient
    accumulation, optional warmup and linear/cosine decay, gradient clipping."""

    def train(
        self,
        model: torch.nn.Module,
        input_ids: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        seed: int,
        context: ClientContext | None = None,
    ) -> TrainResult:
        s, ctx = self.settings, context or ClientContext()
        start = time.perf_counter()
        torch.manual_seed(seed)  # dropout masks
        rng = np.random.default_rng(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device
        named, anchors, masks = context_tensors(model, ctx)
        # A fresh optimizer per client: no state carries over from the worker's previous client.
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        total_steps = s.num_steps(len(input_ids))
        order = batch_order(len(input_ids), total_steps * s.batch_size, rng)
        result = TrainResult()
        model.train()
        for step in range(total_steps):
            for group in optimizer.param_groups:
                group["lr"] = s.lr * lr_factor(step, total_steps, s.lr_scheduler, s.warmup_steps)
            step_loss = 0.0
            for micro in range(s.accumulation):
                batch = micro_batch(input_ids, labels, order, step, micro, s, device)
                if not (batch["labels"] != IGNORE_INDEX).any():
                    continue  # every answer was cut off by cutoff_len: no signal, and a NaN loss
                loss = model(**batch).loss / s.accumulation
                loss.backward()
                step_loss += loss.item()
                result.tokens += int(batch["attention_mask"].sum())
            if ctx.prox_mu:
                add_proximal_gradient(named, anchors, ctx.prox_mu)
            if s.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_now = optimizer.param_groups[0]["lr"]
            if ctx.correction is not None:
                apply_correction(named, ctx.correction, lr_now)
            apply_masks(named, masks)
            result.lr_sum += lr_now
            result.losses.append(step_loss)
        model.eval()
        result.examples = len(order)
        result.seconds = time.perf_counter() - start
        return result


def context_tensors(
    model: torch.nn.Module, ctx: ClientContext
) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The named LoRA parameters, FedProx anchors (the global adapter: the parameters as training
    starts) and rank masks that `ctx` needs; components a lower-rank client does not own are
    zeroed before training starts."""
    if ctx.is_plain:
        return {}, {}, {}
    from fedsim.lora_ranks import rank_mask
    from fedsim.model import adapter_parameters

    named = adapter_parameters(model)
    masks = {}
    if ctx.lora_rank is not None:
        for key, p in named.items():
            mask = rank_mask(key, p.shape, ctx.lora_rank)
            if mask is not None:
                masks[key] = mask.to(p.dtype)
        apply_masks(named, masks)
    # after masking, so the proximal term never pulls on components the client does not own
    anchors = {k: p.detach().clone() for k, p in named.items()} if ctx.prox_mu else {}
    return named, anchors, masks


def apply_masks(named: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    """Zero the LoRA components a lower-rank client does not own (after every optimizer step)."""
    with torch.no_grad():
        for key, mask in masks.items():
            named[key].mul_(mask)


TRAINERS: dict[str, type[Trainer]] = {"torch": TorchTrainer}
"""`client.backend` -> trainer class; `fedsim/client/__init__.py` adds the backends that live in
modules of their own (deepspeed), which import this one."""
