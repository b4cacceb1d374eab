"""Fixtures of the client tests: every backend on a tiny model built in the test, and a WorkerSpec
over the tiny test experiment's shards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from fedsim.client.trainer import TrainResult, TrainSettings, trainer_class
from fedsim.config import ClientConfig, config_from_dict
from fedsim.driver import worker_spec
from fedsim.model import load_tokenizer
from fedsim.prepare import build_shards, materialise, prepare_run
from fedsim.protocol import ClientContext
from tests.conftest import tiny_experiment, tiny_lora_llama

BACKENDS = {
    "torch": ("torch", None),
    "ds-zero0": ("deepspeed", None),
    "ds-zero2": ("deepspeed", {"zero_optimization": {"stage": 2}}),
}
"""Backends in fp32, where they agree bit for bit: name -> (client.backend, client.deepspeed)."""


def settings(**client: Any) -> TrainSettings:
    """TrainSettings of a `client` section: 4 examples per step in micro-batches of 2."""
    base = {"local_steps": 6, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2}
    return TrainSettings(ClientConfig(**{**base, **client}))


class TinyTrainer:
    """One backend's trainer on its own tiny LLaMA (a DeepSpeed engine wraps one model only), as
    the worker drives it: load the starting adapter, train, read the adapter back."""

    def __init__(self, backend: str, s: TrainSettings, vocab_size: int, lora_seed: int) -> None:
        self.model = tiny_lora_llama(vocab_size=vocab_size, lora_seed=lora_seed)
        self.trainer = trainer_class(backend)(s)
        self.trainer.prepare(self.model)

    def train(
        self, start: dict, ids: list, labels: list, seed: int, context: ClientContext | None = None
    ) -> tuple[dict[str, torch.Tensor], TrainResult]:
        self.trainer.load_adapter(self.model, start)
        result = self.trainer.train(self.model, ids, labels, seed=seed, context=context)
        return self.trainer.read_adapter(self.model), result


@pytest.fixture(scope="module", params=list(BACKENDS))
def tiny(request) -> Callable[..., TinyTrainer]:
    """Per backend: `tiny(settings, vocab_size, lora_seed)`, a TinyTrainer built once per
    module for each distinct argument list."""
    backend, deepspeed = BACKENDS[request.param]
    built: dict[str, TinyTrainer] = {}

    def make(s: TrainSettings, vocab_size: int, lora_seed: int) -> TinyTrainer:
        s = s.with_client(backend=backend, deepspeed=deepspeed)
        key = repr((s, vocab_size, lora_seed))  # settings hold a dict: not hashable
        if key not in built:
            built[key] = TinyTrainer(backend, s, vocab_size, lora_seed)
        return built[key]

    return make


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """A WorkerSpec over the tiny test experiment's shards (4 local steps, 2 micro-batches)."""
    tmp = tmp_path_factory.mktemp("client")
    client = {"local_steps": 4, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2}
    cfg = config_from_dict(tiny_experiment(tmp, client=client))
    prep = prepare_run(cfg, log=lambda _: None)
    shards = materialise(prep, overwrite=False, log=lambda _: None)
    build_shards(prep, shards, log=lambda _: None)
    return worker_spec(cfg, prep.model_path, shards, load_tokenizer(prep.model_path).pad_token_id)
