"""The ClientWorker: one per CPU/GPU slot, holding the frozen base model once for the whole run.

Virtual clients are data, not processes: for each client it is handed, a worker loads the global
adapter into its LoRA modules, reads the client's shard from the memory-mapped Arrow store, trains
locally and returns only the LoRA tensors. Outcomes are values (`ClientOutcome`), never exceptions
across the actor boundary, so the driver's failure policy decides what a failed client means.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from fedsim.client.trainer import TRAINERS, ClientContext, TrainSettings
from fedsim.config import CompressionConfig
from fedsim.data.shards import ShardStore
from fedsim.model import (
    LoraSpec,
    adapter_config_dict,
    attach_lora,
    get_adapter,
    load_base_model,
    set_adapter,
)
from fedsim.server.strategies import scaffold_client_variate
from fedsim.uplink import ClientUpload, encode_upload

TensorDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its model and trainer once."""

    model_path: str
    model_name: str
    dtype: str
    lora: LoraSpec
    seed: int
    shards_dir: str
    backend: str
    settings: TrainSettings
    num_threads: int = 1
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Uplink compression of the client's delta (`client.compression`)."""


@dataclass(frozen=True)
class ClientTask:
    round_idx: int
    client_id: int
    seed: int


@dataclass
class ClientOutcome:
    """The result of one client's turn, successful or not (the adapter travels separately)."""

    client_id: int
    ok: bool
    num_samples: int = 0
    losses: list[float] = field(default_factory=list)
    examples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    worker: str = ""
    error: str | None = None
    attempts: int = 1
    """Which try this outcome is from (a client whose worker died is retried)."""
    worker_lost: bool = False
    """The worker process died during this client's turn (as opposed to training raising)."""

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


FAULTS_ENV = "FEDSIM_FAULTS"
"""Fault injection for fedsim's own failure tests: a JSON list of {"round": r, "client": c}; that
client raises inside its turn in that round. Unset in normal use."""


def raise_injected_fault(task: ClientTask) -> None:
    for fault in json.loads(os.environ.get(FAULTS_ENV) or "[]"):
        if (fault.get("round"), fault.get("client")) == (task.round_idx, task.client_id):
            raise RuntimeError(f"injected fault ({FAULTS_ENV}) for client {task.client_id}")


def quiet_libraries() -> None:
    """Silence per-load progress bars and deprecation chatter that would flood the driver's log."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


class ClientWorker:
    """Trains virtual clients one after another on a model built once."""

    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(max(1, spec.num_threads))
        quiet_libraries()
        self.spec = spec
        base = load_base_model(spec.model_path, dtype=spec.dtype)
        self.model = attach_lora(base, spec.lora, seed=spec.seed)
        self._initial_adapter = get_adapter(self.model)
        self.store = ShardStore(spec.shards_dir)
        self.trainer = TRAINERS[spec.backend](spec.settings)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def initial_adapter(self) -> TensorDict:
        """The round-0 global adapter: LoRA as initialised from the run's seed."""
        return self._initial_adapter

    def adapter_config(self) -> dict[str, Any]:
        """Content of adapter_config.json for checkpoints of this run."""
        return adapter_config_dict(self.model, self.spec.model_name)

    def info(self) -> dict[str, Any]:
        return {"worker": self.name, "node_id": ray.get_runtime_context().get_node_id()}

    def train(
        self, task: ClientTask, global_adapter: TensorDict, context: ClientContext | None = None
    ) -> tuple[ClientOutcome, ClientUpload]:
        """Run one client's local training from `global_adapter`; returns (outcome, its upload:
        the adapter, or its compressed delta, plus any client state the strategy keeps)."""
        start = time.perf_counter()
        outcome = ClientOutcome(client_id=task.client_id, ok=False, worker=self.name)
        ctx = context or ClientContext()
        try:
            raise_injected_fault(task)
            set_adapter(self.model, global_adapter)
            input_ids, labels = self.store.client_examples(task.client_id).to_lists()
            outcome.num_samples = len(input_ids)
            # a plain context is not passed, so trainers without the `context` parameter still run
            extra = {} if ctx.is_plain else {"context": ctx}
            result = self.trainer.train(self.model, input_ids, labels, task.seed, **extra)
            local = get_adapter(self.model)
            z = self.spec.compression
            adapter = encode_upload(
                local, global_adapter, z.kind, z.block_size, z.topk_fraction, ctx.lora_rank
            )
            if ctx.correction is not None:
                adapter.client_state = scaffold_client_variate(
                    ctx.correction, global_adapter, local, result.lr_sum
                )
        except Exception:
            outcome.error = traceback.format_exc()
            outcome.total_seconds = time.perf_counter() - start
            return outcome, ClientUpload({})
        outcome.ok = True
        outcome.losses = result.losses
        outcome.examples = result.examples
        outcome.tokens = result.tokens
        outcome.train_seconds = result.seconds
        outcome.total_seconds = time.perf_counter() - start
        return outcome, adapter


ClientWorkerActor = ray.remote(ClientWorker)
