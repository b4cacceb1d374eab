"""The DeepSpeed backend (`client.backend: deepspeed`): local LoRA tuning on a DeepSpeed engine.

Each ClientWorker builds one engine (`deepspeed.initialize`) when it starts and reuses it for every
client it serves. Between clients the engine is put back to a fresh start: the global adapter is
written into the LoRA parameters *and* into DeepSpeed's fp32 master copy (ZeRO 1/2 and bf16 keep
one; writing only the module's weights would be undone by the next optimizer step), the optimizer
state is dropped, the step counters and the loss scale are reset, and the lr follows fedsim's
schedule from step 0. So a client's update depends only on (global adapter, shard, seed), never on
the clients the worker served before, as with the torch backend. The training loop itself is
fedsim's (`Trainer.train`); the engine supplies its operations (micro-step, lr, weights).

One source of truth for the numbers both fedsim and DeepSpeed know: batch sizes and gradient
accumulation come from `client.batch_size` / `client.micro_batch_size`, clipping from
`client.max_grad_norm`, the optimizer (AdamW) and lr schedule from `client.lr*`. A DeepSpeed config
that sets any of them differently is an error naming the key, not silently overridden.

Each worker is its own world of size 1: the process group is a gloo group over an in-memory
store, so several workers on one machine never compete for a rendezvous port. With one rank ZeRO
partitions nothing; what ZeRO 1/2 bring here is optimizer offload and DeepSpeed's mixed precision.

DeepSpeed JIT-compiles C++ ops on first use (on CPU: its shared-memory comm op at every
`deepspeed.initialize`, and `cpu_adam` for optimizer offload). They are compiled once per machine
into `$TORCH_EXTENSIONS_DIR`, by default `<FEDSIM_CACHE_DIR>/torch_extensions`, and loaded from
there afterwards.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch

from fedsim.client.context import WeightUpdate
from fedsim.client.trainer import ExtraLoss, Trainer, TrainSettings
from fedsim.deepspeed_config import worker_config
from fedsim.model import adapter_parameters
from fedsim.model_files import default_cache_dir

TensorDict = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------
# Config: checked at load time (fedsim/deepspeed_config.py), built once per worker
# ---------------------------------------------------------------------------------------------


def build_deepspeed_config(settings: TrainSettings) -> dict[str, Any]:
    """The DeepSpeed config of a worker: `client.deepspeed` with fedsim's batch sizes and
    clipping filled in (`deepspeed_config_problems` has refused any that disagree)."""
    c = settings.client
    return worker_config(
        c.deepspeed,
        batch_size=c.batch_size,
        micro_batch_size=c.micro_batch_size,
        max_grad_norm=c.max_grad_norm,
    )


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device") == "cpu"


# ---------------------------------------------------------------------------------------------
# Process-wide set-up: JIT op cache and a one-rank process group
# ---------------------------------------------------------------------------------------------


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-compiled ops are cached: `$TORCH_EXTENSIONS_DIR` if set, else
    `<fedsim cache>/torch_extensions` (set for this process so DeepSpeed's builders use it)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(default_cache_dir() / "torch_extensions")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def init_single_rank_group() -> None:
    """Make this process rank 0 of a world of size 1 (once), as DeepSpeed requires.

    A gloo group over an in-memory HashStore needs no rendezvous, so no port: any number of
    workers on one machine start without colliding.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("fedsim's DeepSpeed workers expect a world of size 1")
        return
    # DeepSpeed reads these (device index, rank checks) even when the group already exists.
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class DeepSpeedTrainer(Trainer):
    """Local training on a DeepSpeed engine built once per worker (see the module docstring).

    The engine owns gradient accumulation, clipping and the optimizer step: each micro-batch is
    one `engine.backward` + `engine.step`, and the engine steps at its accumulation boundary,
    which fedsim's config keeps on fedsim's optimizer steps."""

    owns_gradients = True

    def __init__(self, settings: TrainSettings) -> None:
        super().__init__(settings)
        self.ds_config = build_deepspeed_config(settings)
        self.engine: Any = None
        self._params: dict[str, torch.nn.Parameter] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._scaler_state: dict[str, Any] | None = None
        self._stale = False
        self.init_seconds = 0.0
        """Seconds the last `deepspeed.initialize` took (JIT op builds included)."""

    # -- once per worker ------------------------------------------------------------------------

    def prepare(self, model: torch.nn.Module) -> None:
        """Build the engine around `model`'s trainable (LoRA) parameters."""
        extensions_dir()
        init_single_rank_group()
        import deepspeed

        start = time.perf_counter()
        params = adapter_parameters(model)  # PEFT's saved names, as adapters and contexts use
        # Adapters leave the worker in the dtype they arrived in, whatever precision DeepSpeed
        # trains in (bf16 casts the module, LoRA included; a rebuilt engine sees the cast one).
        self._dtypes = self._dtypes or {k: p.dtype for k, p in params.items()}
        self._params = params
        c = self.settings.client
        if offloads_optimizer(self.ds_config):
            # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam (the cpu_adam JIT op).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer: Any = DeepSpeedCPUAdam(
                list(params.values()), lr=c.lr, weight_decay=c.weight_decay, adamw_mode=True
            )
        else:
            # A plain torch optimizer: no JIT-built optimizer op needed.
            optimizer = torch.optim.AdamW(
                list(params.values()), lr=c.lr, weight_decay=c.weight_decay
            )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=copy.deepcopy(self.ds_config)
        )
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        self._scaler_state = copy.deepcopy(vars(scaler)) if scaler is not None else None
        self._stale = False
        self.init_seconds = time.perf_counter() - start

    # -- once per client ------------------------------------------------------------------------

    def load_adapter(self, model: torch.nn.Module, adapter: TensorDict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        if self.engine is None or self._stale:
            self.prepare(model)  # first use, or the previous client failed half-way
        if set(adapter) != set(self._params):
            missing, extra = set(self._params) - set(adapter), set(adapter) - set(self._params)
            raise ValueError(
                f"adapter keys do not match the model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]}"
            )
        with torch.no_grad():
            for key, param in self._params.items():
                value = adapter[key]
                param.data.copy_(value)
                # The fp32 master copy of ZeRO 1/2 and bf16 training; no-op where there is none.
                safe_set_full_fp32_param(param, value.to(param.device, torch.float32))

    def read_adapter(self, model: torch.nn.Module) -> TensorDict:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for key, param in self._params.items():
            master = safe_get_full_fp32_param(param)
            value = master if master is not None else param.detach()
            out[key] = value.to("cpu", self._dtypes[key], copy=True).contiguous()
        return out

    def begin(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """Forget everything the previous client left: optimizer moments, counters, loss scale."""
        if self.engine is None:
            self.prepare(model)
        engine = self.engine
        # AdamW and DeepSpeedCPUAdam create their moments (and step 0) lazily when empty.
        self._inner_optimizer().state.clear()
        engine.global_steps = engine.global_samples = engine.micro_steps = 0
        engine.skipped_steps = 0
        if self._scaler_state is not None:
            vars(engine.optimizer.loss_scaler).update(copy.deepcopy(self._scaler_state))
        self._stale = True  # until this client finishes cleanly
        engine.train()
        return self._params

    def end(self, model: torch.nn.Module) -> None:
        self.engine.eval()
        self._stale = False

    # -- the loop's operations ------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def set_lr(self, lr: float) -> None:
        # fedsim's schedule, not a DeepSpeed scheduler: set on the optimizer the engine wraps.
        for group in self._inner_optimizer().param_groups:
            group["lr"] = lr

    def forward_backward(self, batch: dict[str, torch.Tensor], extra: ExtraLoss | None) -> float:
        loss = self.engine(**batch).loss
        share = loss.item() / self.settings.accumulation
        self._backward_and_step(loss, extra)
        return share

    def skip_micro_batch(self, batch: dict[str, torch.Tensor], extra: ExtraLoss | None) -> None:
        # The engine still needs the micro-step, so that its accumulation boundary stays on
        # fedsim's optimizer steps; a zero loss adds nothing, and the forked RNG keeps the
        # dropout masks of later batches those of the torch backend.
        with torch.random.fork_rng(devices=_rng_devices(self.engine.device)):
            loss = self.engine(**batch).logits.sum() * 0.0
        self._backward_and_step(loss, extra)

    def step(self) -> None:
        return None  # `engine.step` after each micro-batch steps at the accumulation boundary

    def update_weights(self, update: WeightUpdate) -> None:
        """In DeepSpeed's fp32 master copy (where it keeps one) and the module's weights alike."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        with torch.no_grad():
            for key, param in self._params.items():
                master = safe_get_full_fp32_param(param)
                value = update(key, master if master is not None else param.detach().float())
                if master is not None:
                    safe_set_full_fp32_param(param, value)
                param.data.copy_(value)

    def _backward_and_step(self, loss: torch.Tensor, extra: ExtraLoss | None) -> None:
        if extra is not None:
            loss = loss + extra()
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps
        self.engine.step()  # clips and steps the optimizer at the accumulation boundary

    def _inner_optimizer(self) -> Any:
        return getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []
