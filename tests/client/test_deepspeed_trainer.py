"""The DeepSpeed backend on a real engine (DeepSpeed's CPU accelerator), built in this process.

Two properties the federated loop relies on:

* engine reuse is invisible: a worker that served other clients before gives a client exactly the
  update a fresh worker gives it (optimizer moments, step counters, fp32 master weights reset);
* the backends agree: same seed, same data, the deepspeed and torch backends reach the same train
  losses: within FP32_RTOL in fp32 (ZeRO 0 and 2 only reorganise where the fp32 numbers live;
  on CPU they come out bitwise equal) and within BF16_RTOL in bf16 (activations rounded).
"""

import dataclasses

import pytest
import torch

from fedsim.client.deepspeed_trainer import DeepSpeedTrainer
from fedsim.client.trainer import ClientContext
from fedsim.client.worker import ClientTask, ClientWorker
from fedsim.config import config_from_dict
from fedsim.driver import build_shards, materialise, prepare_run, worker_spec
from fedsim.model import load_tokenizer
from tests.conftest import tiny_experiment

FP32_RTOL = 1e-6
BF16_RTOL = 2e-2
ZERO2 = {"zero_optimization": {"stage": 2}}
ZERO1_BF16 = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """A WorkerSpec over the tiny test experiment's shards (4 local steps, 2 micro-batches)."""
    tmp = tmp_path_factory.mktemp("ds")
    client = {"local_steps": 4, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2}
    cfg = config_from_dict(tiny_experiment(tmp, client=client))
    prep = prepare_run(cfg, log=lambda _: None)
    shards = materialise(prep, overwrite=False, log=lambda _: None)
    build_shards(prep, shards, log=lambda _: None)
    return worker_spec(cfg, prep.model_path, shards, load_tokenizer(prep.model_path).pad_token_id)


def make_worker(spec, backend: str, deepspeed: dict | None = None) -> ClientWorker:
    settings = dataclasses.replace(spec.settings, deepspeed=deepspeed)
    return ClientWorker(dataclasses.replace(spec, backend=backend, settings=settings))


def train(
    worker: ClientWorker, client: int, adapter: dict, context: ClientContext | None = None
) -> tuple[list[float], dict]:
    outcome, upload = worker.train(ClientTask(1, client, 100 + client), adapter, context)
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


def test_deepspeed_and_torch_reach_the_same_losses(spec):
    torch_worker = make_worker(spec, "torch")
    start = torch_worker.initial_adapter()
    reference, reference_adapter = train(torch_worker, 2, start)
    for deepspeed in (None, ZERO2):
        losses, adapter = train(make_worker(spec, "deepspeed", deepspeed), 2, start)
        assert losses == pytest.approx(reference, rel=FP32_RTOL), deepspeed
        for key in adapter:
            torch.testing.assert_close(adapter[key], reference_adapter[key], rtol=1e-5, atol=1e-7)
    losses, _ = train(make_worker(spec, "deepspeed", ZERO1_BF16), 2, start)
    assert losses != reference
    assert losses == pytest.approx(reference, rel=BF16_RTOL)


@pytest.mark.parametrize("deepspeed", [None, ZERO2], ids=["zero0", "zero2"])
def test_strategy_contexts_match_the_torch_backend(spec, deepspeed):
    """FedProx's term, SCAFFOLD's correction and a lower LoRA rank, all at once: the deepspeed
    backend applies them as the torch backend does (through DeepSpeed's master weights)."""
    torch_worker = make_worker(spec, "torch")
    start = torch_worker.initial_adapter()
    gen = torch.Generator().manual_seed(0)
    correction = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    context = ClientContext(prox_mu=0.5, correction=correction, lora_rank=2)
    reference, reference_adapter = train(torch_worker, 2, start, context)
    losses, adapter = train(make_worker(spec, "deepspeed", deepspeed), 2, start, context)
    assert losses == pytest.approx(reference, rel=1e-5)
    assert adapter.keys() == reference_adapter.keys()
    for key in adapter:
        torch.testing.assert_close(adapter[key], reference_adapter[key], rtol=1e-4, atol=1e-6)
    plain, _ = train(make_worker(spec, "deepspeed", deepspeed), 2, start)
    assert plain != losses  # the context did change training


def test_deepspeed_settings_reach_the_engine(spec):
    worker = make_worker(spec, "deepspeed", ZERO1_BF16)
    engine = worker.trainer.engine
    assert isinstance(worker.trainer, DeepSpeedTrainer)
    assert engine.zero_optimization_stage() == 1
    assert engine.bfloat16_enabled()
    assert engine.train_micro_batch_size_per_gpu() == spec.settings.micro_batch_size
    assert engine.gradient_accumulation_steps() == spec.settings.accumulation
    assert engine.gradient_clipping() == spec.settings.max_grad_norm
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
