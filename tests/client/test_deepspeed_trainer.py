"""The DeepSpeed backend on a real engine (DeepSpeed's CPU accelerator), built in this process.

Engine reuse is invisible: a worker that served other clients before gives a client exactly the
update a fresh worker gives it (optimizer moments, step counters, fp32 master weights reset).
In bf16 the losses stay within BF16_RTOL of fp32 training (activations rounded); that the
backends agree in fp32, algorithm by algorithm, is tests/client/test_backends.py.
"""

import dataclasses

import pytest
import torch

from fedsim.client.deepspeed_trainer import DeepSpeedTrainer
from fedsim.client.worker import ClientWorker
from fedsim.protocol import ClientTask
from tests.client.conftest import BACKENDS

BF16_RTOL = 2e-2
ZERO2 = BACKENDS["ds-zero2"][1]
ZERO1_BF16 = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}


def make_worker(spec, backend: str, deepspeed: dict | None = None) -> ClientWorker:
    settings = spec.settings.with_client(backend=backend, deepspeed=deepspeed)
    return ClientWorker(dataclasses.replace(spec, backend=backend, settings=settings))


def train(worker: ClientWorker, client: int, adapter: dict) -> tuple[list[float], dict]:
    outcome, upload = worker.train(ClientTask(1, client, 100 + client), adapter)
    assert outcome.ok, outcome.error
    return outcome.losses, upload.tensors


@pytest.mark.parametrize("deepspeed", [None, ZERO2, ZERO1_BF16], ids=["zero0", "zero2", "bf16"])
def test_result_does_not_depend_on_the_clients_served_before(spec, deepspeed):
    served = make_worker(spec, "deepspeed", deepspeed)
    engine = served.trainer.engine
    start = served.initial_adapter()
    # The worker's history: two clients, the second from another starting adapter, so that
    # optimizer moments, step counters and master weights all hold something else.
    _, other = train(served, 1, start)
    train(served, 3, other)
    losses, adapter = train(served, 2, start)
    assert served.trainer.engine is engine  # built once, reused

    fresh_losses, fresh_adapter = train(make_worker(spec, "deepspeed", deepspeed), 2, start)
    assert losses == fresh_losses
    assert adapter.keys() == fresh_adapter.keys()
    for key in adapter:
        assert torch.equal(adapter[key], fresh_adapter[key]), key
        assert adapter[key].dtype == start[key].dtype  # bf16 training, fp32 adapters
    assert any(not torch.equal(adapter[k], start[k]) for k in adapter)


def test_bf16_stays_close_to_fp32(spec):
    reference, _ = train(
        make_worker(spec, "torch"), 2, make_worker(spec, "torch").initial_adapter()
    )
    worker = make_worker(spec, "deepspeed", ZERO1_BF16)
    losses, _ = train(worker, 2, worker.initial_adapter())
    assert losses != reference
    assert losses == pytest.approx(reference, rel=BF16_RTOL)


def test_deepspeed_settings_reach_the_engine(spec):
    worker = make_worker(spec, "deepspeed", ZERO1_BF16)
    engine = worker.trainer.engine
    assert isinstance(worker.trainer, DeepSpeedTrainer)
    assert engine.zero_optimization_stage() == 1
    assert engine.bfloat16_enabled()
    assert engine.train_micro_batch_size_per_gpu() == spec.settings.client.micro_batch_size
    assert engine.gradient_accumulation_steps() == spec.settings.accumulation
    assert engine.gradient_clipping() == spec.settings.client.max_grad_norm
    assert next(worker.model.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_optimizer_offload_trains_and_resets(spec):
    """ZeRO-Offload steps with DeepSpeed's CPU Adam (a JIT-built op: minutes the first time on a
    machine, then cached under TORCH_EXTENSIONS_DIR)."""
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    served = make_worker(spec, "deepspeed", offload)
    start = served.initial_adapter()
    train(served, 1, start)
    losses, adapter = train(served, 2, start)
    fresh_losses, fresh_adapter = train(make_worker(spec, "deepspeed", offload), 2, start)
    assert losses == fresh_losses
    assert all(torch.equal(adapter[k], fresh_adapter[k]) for k in adapter)
    reference, _ = train(make_worker(spec, "torch"), 2, start)
    assert losses == pytest.approx(reference, rel=1e-4)


def test_compiled_ops_are_cached_per_machine(spec):
    """The engine's JIT-built comm op lands in the persistent extensions cache, not in a folder
    of this test session."""
    from fedsim.client.deepspeed_trainer import extensions_dir

    make_worker(spec, "deepspeed")
    cache = extensions_dir()
    assert list(cache.rglob("deepspeed_shm_comm*")), cache
    assert not cache.is_relative_to(spec.shards_dir.rsplit("/runs/", 1)[0])
