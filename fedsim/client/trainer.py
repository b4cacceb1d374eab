"""Local training: one client's LoRA tuning on its shard, one loop for every backend.

The worker hands a trainer the model with the global adapter already loaded, the client's
tokenised examples and a seed, and gets back a `TrainResult`. Everything random (batch order,
dropout) derives from that seed, so a client's update depends only on (global adapter, shard,
seed), not on what the worker did before.

`Trainer.train` is the loop, written once: seeding, batch order, gradient accumulation, the lr
schedule, FedProx, SCAFFOLD, rank masks and the bookkeeping. A backend is a subclass that
supplies a handful of operations (the abstract methods below: start a client, forward/backward a
micro-batch, take the optimizer step, set the lr, rewrite its weights); `TorchTrainer` here,
`DeepSpeedTrainer` in `deepspeed_trainer.py`.
"""

from __future__ import annotations

import importlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedsim.client.context import (
    ProximalTerm,
    WeightUpdate,
    corrected,
    frozen_lora_a,
    held,
    masked,
    rank_masks,
    zero_gradients_of,
)
from fedsim.client.spec import TrainSettings
from fedsim.model import adapter_parameters, get_adapter, set_adapter
from fedsim.protocol import ClientContext

IGNORE_INDEX = -100
TensorDict = dict[str, torch.Tensor]
ExtraLoss = Callable[[], torch.Tensor]


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
    c = settings.client
    lo = step * c.batch_size + micro * c.micro_batch_size
    idx = order[lo : lo + c.micro_batch_size]
    batch = collate([input_ids[i] for i in idx], [labels[i] for i in idx], settings.pad_token_id)
    return {k: v.to(device) for k, v in batch.items()}


class Trainer(ABC):
    """A local training backend, and the one loop (`train`) that drives every backend.

    The worker calls `prepare` once with its model, then for each client `load_adapter`, `train`
    and `read_adapter`. The adapter defaults move adapters straight in and out of the model's
    LoRA parameters; a backend that keeps its own copy of the weights (DeepSpeed's fp32 master
    copy) overrides them.
    """

    owns_gradients: bool = False
    """True for an engine that keeps the accumulated gradients to itself and clips and steps at
    its own accumulation boundary (DeepSpeed): FedProx's term then enters each micro-batch's
    loss instead of the accumulated gradient."""

    def __init__(self, settings: TrainSettings) -> None:
        self.settings = settings

    def prepare(self, model: torch.nn.Module) -> None:
        """Build whatever the backend keeps for the whole run (called once per worker); the
        default keeps nothing."""
        return None

    def load_adapter(self, model: torch.nn.Module, adapter: TensorDict) -> None:
        """Make `adapter` (PEFT key names) the starting point of the next `train`."""
        set_adapter(model, adapter)

    def read_adapter(self, model: torch.nn.Module) -> TensorDict:
        """The trained adapter: PEFT key names, contiguous CPU tensors."""
        return get_adapter(model)

    # -- the operations a backend supplies ----------------------------------------------------

    @abstractmethod
    def begin(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """Start a client from a clean slate (fresh optimizer state and counters, train mode);
        returns the trainable parameters keyed by PEFT's adapter names."""

    @abstractmethod
    def end(self, model: torch.nn.Module) -> None:
        """The client finished cleanly: back to eval mode."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where micro-batches go."""

    @abstractmethod
    def set_lr(self, lr: float) -> None:
        """The learning rate of the next optimizer step."""

    @abstractmethod
    def forward_backward(self, batch: dict[str, torch.Tensor], extra: ExtraLoss | None) -> float:
        """Forward and backward one micro-batch (its loss plus `extra()` when given), scaled for
        gradient accumulation; returns the micro-batch's share of the step's mean loss."""

    def skip_micro_batch(self, batch: dict[str, torch.Tensor], extra: ExtraLoss | None) -> None:
        """A micro-batch without a single label (every answer cut off by cutoff_len: no signal,
        and a NaN loss). The default skips it; an engine that counts micro-batches overrides."""
        return None

    @abstractmethod
    def step(self) -> None:
        """Clip the accumulated gradients to `client.max_grad_norm`, take the optimizer step and
        clear them (a no-op for an engine that steps at its own accumulation boundary)."""

    @abstractmethod
    def update_weights(self, update: WeightUpdate) -> None:
        """Apply `update(key, weight) -> new weight` to every LoRA parameter, wherever the
        backend keeps the weights the optimizer steps (DeepSpeed: its fp32 master copy)."""

    # -- the loop ----------------------------------------------------------------------------

    def train(
        self,
        model: torch.nn.Module,
        input_ids: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        seed: int,
        context: ClientContext | None = None,
    ) -> TrainResult:
        """Tune the trainable (LoRA) parameters of `model` in place on the given examples,
        honouring `context` (FedProx term, SCAFFOLD correction, LoRA rank, FFA-LoRA's frozen A)
        when given."""
        ctx = context or ClientContext()
        start = time.perf_counter()
        params = self.begin(model)
        torch.manual_seed(seed)  # dropout masks
        rng = np.random.default_rng(seed)
        masks = rank_masks(params, ctx.lora_rank)
        if masks:  # components a lower-rank client does not own start at zero
            self.update_weights(masked(masks))
        # FFA-LoRA: A gets no gradient (so it adds nothing to the clipped norm) and is put back
        # after every step (decoupled weight decay would still shrink it)
        anchors = frozen_lora_a(params) if ctx.freeze_lora_a else {}
        hooks = zero_gradients_of(params, list(anchors))
        try:
            result = self._loop(params, input_ids, labels, rng, ctx, masks, anchors)
        finally:  # the worker's next client may not freeze A
            for hook in hooks:
                hook.remove()
        self.end(model)
        result.seconds = time.perf_counter() - start
        return result

    def _loop(
        self,
        params: dict[str, torch.nn.Parameter],
        input_ids: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        rng: np.random.Generator,
        ctx: ClientContext,
        masks: TensorDict,
        anchors: TensorDict,
    ) -> TrainResult:
        """The optimizer steps of `train`, after its set-up."""
        s, c = self.settings, self.settings.client
        prox = ProximalTerm(params, ctx.prox_mu) if ctx.prox_mu else None
        extra = prox.loss if prox is not None and self.owns_gradients else None
        total_steps = s.num_steps(len(input_ids))
        order = batch_order(len(input_ids), total_steps * c.batch_size, rng)
        result = TrainResult()
        for step in range(total_steps):
            lr = c.lr * lr_factor(step, total_steps, c.lr_scheduler, c.warmup_steps)
            self.set_lr(lr)
            step_loss = 0.0
            for micro in range(s.accumulation):
                batch = micro_batch(input_ids, labels, order, step, micro, s, self.device)
                if not (batch["labels"] != IGNORE_INDEX).any():
                    self.skip_micro_batch(batch, extra)
                    continue
                step_loss += self.forward_backward(batch, extra)
                result.tokens += int(batch["attention_mask"].sum())
            if prox is not None and not self.owns_gradients:
                prox.add_gradient()  # before clipping, as if the term were in the loss
            self.step()
            if ctx.correction is not None:
                self.update_weights(corrected(ctx.correction, lr))
            if masks:
                self.update_weights(masked(masks))
            if anchors:
                self.update_weights(held(anchors))
            result.lr_sum += lr
            result.losses.append(step_loss)
        result.examples = len(order)
        return result


class TorchTrainer(Trainer):
    """Plain PyTorch: a fresh AdamW per client over the trainable parameters, gradients
    accumulated in `.grad`, clipped with `clip_grad_norm_`."""

    def begin(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        c = self.settings.client
        self._model = model
        self._params = adapter_parameters(model)
        self._device = next(iter(self._params.values())).device
        # A fresh optimizer per client: no state carries over from the worker's previous client.
        params = list(self._params.values())
        self._optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        model.train()
        return self._params

    def end(self, model: torch.nn.Module) -> None:
        model.eval()

    @property
    def device(self) -> torch.device:
        return self._device

    def set_lr(self, lr: float) -> None:
        for group in self._optimizer.param_groups:
            group["lr"] = lr

    def forward_backward(self, batch: dict[str, torch.Tensor], extra: ExtraLoss | None) -> float:
        loss = self._model(**batch).loss
        if extra is not None:
            loss = loss + extra()
        loss = loss / self.settings.accumulation
        loss.backward()
        return loss.item()

    def step(self) -> None:
        max_norm = self.settings.client.max_grad_norm
        if max_norm:
            torch.nn.utils.clip_grad_norm_(list(self._params.values()), max_norm)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def update_weights(self, update: WeightUpdate) -> None:
        with torch.no_grad():
            for key, p in self._params.items():
                p.copy_(update(key, p.detach()))


BACKENDS: dict[str, str] = {
    "torch": "fedsim.client.trainer:TorchTrainer",
    "deepspeed": "fedsim.client.deepspeed_trainer:DeepSpeedTrainer",
}
"""`client.backend` -> where its trainer class lives, imported only when a worker uses it (the
DeepSpeed backend's module imports this one)."""


def trainer_class(backend: str) -> type[Trainer]:
    """The trainer class of `client.backend` `backend`."""
    module, name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), name)
