"""Every backend runs the same local-training loop, so every client-side algorithm gives the same
update whichever backend trains: bit for bit in fp32 (on CPU, DeepSpeed's ZeRO 0 and 2 only
reorganise where the fp32 numbers live), with two exceptions equal up to rounding:

* FedProx, whose term reaches the gradient in the form each backend allows (see `ProximalTerm`);
* ZeRO 2 once gradient clipping bites: it sums the squares of the gradient norm over its own flat
  buffers, in another order than torch's `clip_grad_norm_`.

Through the real ClientWorker, so the upload (compressed delta, SCAFFOLD's client variate) is
compared as the aggregator receives it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedsim.client.trainer import IGNORE_INDEX, batch_order
from fedsim.client.worker import ClientWorker
from fedsim.config import CompressionConfig
from fedsim.lora_ranks import base_weight_name
from fedsim.protocol import ClientContext, ClientTask, ClientUpload
from tests.client.conftest import BACKENDS
from tests.conftest import same_bits


def _correction(start: dict) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}


def _own_b(start: dict) -> dict:
    """FedSA-LoRA: a client's own B, other than the global one."""
    gen = torch.Generator().manual_seed(1)
    return {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in start.items() if "lora_B" in k}


def _base_delta(start: dict) -> dict:
    """FLoRA: a delta merged into every adapted base weight."""
    gen = torch.Generator().manual_seed(3)
    out = {}
    for key, a in start.items():
        if "lora_A" in key:
            shape = (start[key.replace("lora_A", "lora_B")].shape[0], a.shape[1])
            out[base_weight_name(key)] = 0.05 * torch.randn(shape, generator=gen).double()
    return out


# name -> (the context from the starting adapter, client.compression, bitwise across backends)
ALGORITHMS = {
    "plain": (lambda start: None, "none", True),
    "scaffold": (lambda start: ClientContext(correction=_correction(start)), "none", True),
    "hetlora-rank": (lambda start: ClientContext(lora_rank=2), "none", True),
    "int8-upload": (lambda start: None, "int8", True),
    "topk-upload": (lambda start: None, "topk", True),
    "ffa-lora": (lambda start: ClientContext(freeze_lora_a=True), "none", True),
    "fedsa-lora-own-b": (lambda start: ClientContext(start=_own_b(start)), "none", True),
    "flora-merged-base": (
        lambda start: ClientContext(base_delta=_base_delta(start), base_version=1),
        "none",
        True,
    ),
    "fedprox": (lambda start: ClientContext(prox_mu=0.5), "none", False),
    "all-at-once": (
        lambda start: ClientContext(prox_mu=0.5, correction=_correction(start), lora_rank=2),
        "none",
        False,
    ),
}


@pytest.fixture(scope="module")
def workers(spec):
    """`workers(compression, max_grad_norm)`: one ClientWorker per backend, built once per
    argument list."""
    built: dict[tuple[str, float | None], dict[str, ClientWorker]] = {}

    def get(compression: str, max_grad_norm: float | None) -> dict[str, ClientWorker]:
        key = (compression, max_grad_norm)
        if key not in built:
            built[key] = {}
            for name, (backend, deepspeed) in BACKENDS.items():
                client = {"backend": backend, "deepspeed": deepspeed}
                s = dataclasses.replace(
                    spec,
                    backend=backend,
                    settings=spec.settings.with_client(**client, max_grad_norm=max_grad_norm),
                    compression=CompressionConfig(kind=compression, block_size=16),
                )
                built[key][name] = ClientWorker(s)
        return built[key]

    return get


def _start(worker: ClientWorker) -> dict[str, torch.Tensor]:
    """The initial adapter with LoRA B made non-zero too, so that every component matters."""
    gen = torch.Generator().manual_seed(2)
    adapter = worker.initial_adapter()
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in adapter.items()}


def _train(worker: ClientWorker, start: dict, context: ClientContext | None):
    outcome, upload = worker.train(ClientTask(1, 2, 102), start, context)
    assert outcome.ok, outcome.error
    return outcome, upload


def _tensors(upload: ClientUpload) -> dict[str, torch.Tensor]:
    return {**upload.tensors, **{f"state/{k}": v for k, v in upload.client_state.items()}}


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clip", "clip"])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_client_algorithm_gives_the_same_update_on_every_backend(workers, algorithm, clip):
    make_context, compression, bitwise = ALGORITHMS[algorithm]
    by_backend = workers(compression, clip)
    start = _start(by_backend["torch"])
    context = make_context(start)
    reference, reference_upload = _train(by_backend["torch"], start, context)
    expected = _tensors(reference_upload)
    for name, worker in by_backend.items():
        outcome, upload = _train(worker, start, context)
        got = _tensors(upload)
        assert got.keys() == expected.keys(), name
        if bitwise and (clip is None or name != "ds-zero2"):
            assert outcome.losses == reference.losses, name
            for key in got:
                assert same_bits(got[key], expected[key]), (name, key)
        else:  # an algorithm on top lets the rounding drift further than plain training
            rel, atol = (1e-6, 1e-7) if algorithm == "plain" else (1e-5, 1e-6)
            assert outcome.losses == pytest.approx(reference.losses, rel=rel), name
            for key in got:
                torch.testing.assert_close(got[key], expected[key], rtol=10 * rel, atol=atol)
    if context is not None and context.base_delta is not None:
        for worker in by_backend.values():  # a plain turn puts the base back as loaded, for
            _train(worker, start, None)  # the tests below that call a worker's trainer directly
    if algorithm != "plain":  # the algorithm did change the upload
        _, plain = _train(workers("none", clip)["torch"], start, None)
        plain_tensors = _tensors(plain)
        assert plain_tensors.keys() != expected.keys() or any(
            not torch.equal(plain_tensors[k], v) for k, v in expected.items()
        )


def _cut_off_examples(seed: int, steps: int) -> tuple[list[list[int]], list[list[int]]]:
    """Examples of which every other one has its answer cut off, so that with `seed`'s batch
    order (batches of 4, micro-batches of 2) some micro-batches hold no label but every step
    holds one. (A step without any label is where the backends part: torch then takes no
    optimizer step at all, DeepSpeed's engine steps on zero gradients.)"""
    ids = [[(i * 13 + j * 7) % 500 + 3 for j in range(10 + i % 3)] for i in range(10)]
    labels = [
        [IGNORE_INDEX] * 4 + x[4:] if i % 2 == 0 else [IGNORE_INDEX] * len(x)
        for i, x in enumerate(ids)
    ]
    order = batch_order(len(ids), steps * 4, np.random.default_rng(seed)).reshape(steps, 2, 2)
    labelled = np.array([i % 2 == 0 for i in range(len(ids))])[order].any(axis=2)
    assert not labelled.all() and labelled.any(axis=1).all()
    return ids, labels


@pytest.mark.parametrize("algorithm", ["plain", "fedprox"])
def test_micro_batches_without_labels_count_alike_on_every_backend(workers, algorithm):
    """Answers cut off by cutoff_len leave micro-batches without a label: the torch backend
    skips them, DeepSpeed's engine still takes the micro-step; the updates agree all the same."""
    make_context, _, bitwise = ALGORITHMS[algorithm]
    ids, labels = _cut_off_examples(seed=5, steps=4)
    adapters = {}
    for name, worker in workers("none", None).items():
        start = _start(worker)
        worker.trainer.load_adapter(worker.model, start)
        result = worker.trainer.train(worker.model, ids, labels, 5, make_context(start))
        adapters[name] = (result, worker.trainer.read_adapter(worker.model))
    reference, expected = adapters.pop("torch")
    for name, (result, adapter) in adapters.items():
        assert result.tokens == reference.tokens, name
        assert result.losses == (reference.losses if bitwise else pytest.approx(reference.losses))
        for key, value in adapter.items():
            if bitwise:
                assert same_bits(value, expected[key]), (name, key)
            else:
                torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6)
