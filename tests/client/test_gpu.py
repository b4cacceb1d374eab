"""The CUDA paths: GPU workers, fp16 under DeepSpeed, a 4-bit base. They skip themselves where
there is no CUDA GPU (every machine this project has had so far: written, never run)."""

import dataclasses
import importlib.util

import pytest
import torch

from fedsim.client.worker import ClientWorker
from fedsim.config import config_from_dict
from fedsim.driver import worker_spec
from fedsim.model import load_tokenizer
from fedsim.prepare import build_shards, materialise, prepare_run
from fedsim.protocol import ClientTask
from tests.conftest import tiny_experiment

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def gpu_spec(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    cfg = config_from_dict(tiny_experiment(tmp, cluster={"gpus_per_worker": 1}))
    prep = prepare_run(cfg, log=lambda _: None)
    shards = materialise(prep, overwrite=False, log=lambda _: None)
    build_shards(prep, shards, log=lambda _: None)
    spec = worker_spec(cfg, prep.model_path, shards, load_tokenizer(prep.model_path).pad_token_id)
    assert spec.device == "cuda"
    return spec


@pytest.mark.parametrize(
    ("backend", "deepspeed"),
    [
        ("torch", None),
        ("deepspeed", {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}),
        ("deepspeed", {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}),
    ],
)
def test_a_gpu_worker_trains_and_returns_fp32_cpu_adapters(gpu_spec, backend, deepspeed):
    settings = gpu_spec.settings.with_client(deepspeed=deepspeed)
    worker = ClientWorker(dataclasses.replace(gpu_spec, backend=backend, settings=settings))
    start = worker.initial_adapter()
    outcome, upload = worker.train(ClientTask(1, 0, 5), start)
    assert outcome.ok, outcome.error
    adapter = upload.tensors
    for key, value in adapter.items():
        assert value.device.type == "cpu" and value.dtype == start[key].dtype
        assert torch.isfinite(value).all()
    assert any(not torch.equal(adapter[k], start[k]) for k in adapter)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="pip install fedsim[gpu]"
)
def test_a_4bit_base_trains(gpu_spec):
    worker = ClientWorker(dataclasses.replace(gpu_spec, quantization="4bit"))
    outcome, _ = worker.train(ClientTask(1, 0, 5), worker.initial_adapter())
    assert outcome.ok, outcome.error
