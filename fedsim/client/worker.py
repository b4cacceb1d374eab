"""The ClientWorker: one per CPU/GPU slot, holding the frozen base model once for the whole run.

Virtual clients are data, not processes: for each client it is handed, a worker loads the global
adapter into its LoRA modules, reads the client's shard from the memory-mapped Arrow store, trains
locally and returns only the LoRA tensors. Outcomes are values (`ClientOutcome`), never exceptions
across the actor boundary, so the driver's failure policy decides what a failed client means.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import ray
import torch

from fedsim.client.context import scaffold_client_variate
from fedsim.client.spec import WorkerSpec
from fedsim.client.trainer import TrainResult, trainer_class
from fedsim.data.shards import ShardStore
from fedsim.errors import FedsimInputError
from fedsim.faults import raise_client_fault
from fedsim.model import (
    MergedBase,
    adapter_config_dict,
    attach_lora,
    get_adapter,
    greedy_generate,
    load_base_model,
    load_tokenizer,
    quiet_libraries,
)
from fedsim.protocol import (
    ClientContext,
    ClientOutcome,
    ClientTask,
    ClientUpload,
    encode_upload,
)
from fedsim.resources import peak_rss_mb
from fedsim.seeds import Stream, seed_of

TensorDict = dict[str, torch.Tensor]


def raise_injected_fault(task: ClientTask) -> None:
    raise_client_fault(task.round_idx, task.client_id)  # fault tests only (fedsim.faults)


class ClientWorker:
    """Trains virtual clients one after another on a model built once."""

    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(max(1, spec.num_threads))
        quiet_libraries()
        self.spec = spec
        if spec.device == "cuda" and not torch.cuda.is_available():
            raise FedsimInputError(
                f"cluster.gpus_per_worker: this worker on {socket.gethostname()} was given a GPU "
                "but torch sees no CUDA device (a CPU-only torch build?)"
            )
        base, self._model_copy = _load_base(spec)
        self.model = attach_lora(base, spec.lora, seed=seed_of(spec.seed, Stream.LORA_INIT))
        self._initial_adapter = get_adapter(self.model)
        self._merged = MergedBase()  # FLoRA's delta merged into the base weights
        self._tokenizer: Any = None  # loaded on the first probe only
        self.store = _open_shards(spec)
        self.trainer = trainer_class(spec.backend)(spec.settings)
        self.trainer.prepare(self.model)  # e.g. the DeepSpeed engine, built once per worker
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def initial_adapter(self) -> TensorDict:
        """The round-0 global adapter: LoRA as initialised from the run's seed."""
        return self._initial_adapter

    def adapter_config(self) -> dict[str, Any]:
        """Content of adapter_config.json for checkpoints of this run."""
        return adapter_config_dict(self.model, self.spec.model_name)

    def info(self) -> dict[str, Any]:
        return {"worker": self.name, "node_id": self.node_id}

    def generate(
        self, global_adapter: TensorDict, prompts: list[str], max_new_tokens: int
    ) -> list[str]:
        """Greedy answers to `prompts` with `global_adapter` loaded: the driver's per-round
        held-out probe (`eval.probe_per_category`). Decoding draws no random numbers and the
        next client loads its own adapter, so training results do not change."""
        self.trainer.load_adapter(self.model, global_adapter)
        if self._tokenizer is None:
            model_dir = self._model_copy.name if self._model_copy else self.spec.model_path
            self._tokenizer = load_tokenizer(model_dir)
        self.model.eval()
        return greedy_generate(self.model, self._tokenizer, prompts, max_new_tokens)

    def train(
        self, task: ClientTask, global_adapter: TensorDict, context: ClientContext | None = None
    ) -> tuple[ClientOutcome, ClientUpload]:
        """Run one client's local training from `global_adapter`; returns (outcome, its upload:
        the adapter, or its compressed delta, plus any client state the strategy keeps)."""
        start = time.perf_counter()
        ctx = context or ClientContext()
        turn = {
            "client_id": task.client_id,
            "worker": self.name,
            "node": self.node_id,
            "context_bytes": ctx.nbytes(),
        }
        try:
            samples, result, upload = self._train(task, global_adapter, ctx)
        except Exception:
            failed = ClientOutcome(
                ok=False,
                error=traceback.format_exc(),
                total_seconds=time.perf_counter() - start,
                peak_rss_mb=peak_rss_mb(),
                **turn,
            )
            return failed, ClientUpload({})
        outcome = ClientOutcome(
            ok=True,
            num_samples=samples,
            losses=result.losses,
            examples=result.examples,
            tokens=result.tokens,
            train_seconds=result.seconds,
            total_seconds=time.perf_counter() - start,
            upload_bytes=upload.nbytes(),
            peak_rss_mb=peak_rss_mb(),
            **turn,
        )
        return outcome, upload

    def train_batch(
        self, tasks: list[ClientTask], global_adapter: TensorDict, *contexts: ClientContext
    ) -> tuple[list[ClientOutcome], list[ClientUpload]]:
        """Train `tasks` one after another, each from `global_adapter` (and from its context:
        `contexts` holds one per task, in order, or none for plain ones), as `train` would one
        per call; returns every task's outcome, in order, and the uploads of those that
        succeeded, in order. One call for many clients: the global adapter is deserialised
        once, and the driver pays one task, not one per client."""
        outcomes: list[ClientOutcome] = []
        uploads: list[ClientUpload] = []
        for i, task in enumerate(tasks):
            outcome, upload = self.train(task, global_adapter, contexts[i] if contexts else None)
            outcomes.append(outcome)
            if outcome.ok:
                uploads.append(upload)
        return outcomes, uploads

    def _merge_base(self, ctx: ClientContext) -> None:
        """FLoRA: make the base weights W0 + the merged delta of `ctx` (W0 for any other
        strategy), once per merged round: a worker's clients of one round share it."""
        version = ctx.base_version if ctx.base_delta is not None else 0
        if version != (self._merged.version or 0):
            self._merged.apply(self.model, _resolved(ctx.base_delta))
            self._merged.version = version

    def _train(
        self, task: ClientTask, global_adapter: TensorDict, ctx: ClientContext
    ) -> tuple[int, TrainResult, ClientUpload]:
        raise_injected_fault(task)
        self._merge_base(ctx)
        # FedSA-LoRA: the client's own B replaces the global one; the upload stays a delta from
        # the global adapter, so the server averages B like any tensor
        start = global_adapter if ctx.start is None else {**global_adapter, **ctx.start}
        self.trainer.load_adapter(self.model, start)
        if task.shard_ref is not None:
            block = self.store.block_of(task.client_id)
            if not self.store.has_block(block):
                self.store.add_block(block, ray.get(task.shard_ref))
        input_ids, labels = self.store.client_examples(task.client_id).to_lists()
        # a plain context is not passed, so trainers without the `context` parameter still run
        extra = {} if ctx.is_plain else {"context": ctx}
        result = self.trainer.train(self.model, input_ids, labels, task.seed, **extra)
        local = self.trainer.read_adapter(self.model)
        z = self.spec.compression
        upload = encode_upload(
            local, global_adapter, z.kind, z.block_size, z.topk_fraction, ctx.lora_rank
        )
        if ctx.correction is not None:
            state = scaffold_client_variate(ctx.correction, global_adapter, local, result.lr_sum)
            upload = dataclasses.replace(upload, client_state=state)
        return len(input_ids), result, upload


def _resolved(value: Any) -> Any:
    """An ObjectRef's value (a context's tensors put once per round), or the value itself."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _load_base(spec: WorkerSpec) -> tuple[torch.nn.Module, tempfile.TemporaryDirectory | None]:
    """The frozen base model, and the scratch copy it was loaded from when it came through the
    object store (kept while the worker lives: PEFT looks up the model's config.json there)."""

    def load(path: str) -> torch.nn.Module:
        return load_base_model(
            path, dtype=spec.dtype, device=spec.device, quantization=spec.quantization
        )

    if spec.model_files_ref is None:
        return load(spec.model_path), None
    scratch = tempfile.TemporaryDirectory(prefix="fedsim-model-")
    for name, data in ray.get(spec.model_files_ref).items():
        target = Path(scratch.name) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.tobytes())
    return load(scratch.name), scratch


def _open_shards(spec: WorkerSpec) -> ShardStore:
    if spec.shards_ref is None:
        return ShardStore(Path(spec.shards_dir))
    return ShardStore.from_index(ray.get(spec.shards_ref), where=spec.shards_dir)
