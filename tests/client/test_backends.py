"""Every backend runs the same local-training loop, so every client-side algorithm gives the same
update whichever backend trains: bit for bit in fp32 (on CPU, DeepSpeed's ZeRO 0 and 2 only
reorganise where the fp32 numbers live), except FedProx, whose term reaches the gradient in the
form each backend allows (see `ProximalTerm`), equal up to rounding.

Through the real ClientWorker, so the upload (compressed delta, SCAFFOLD's client variate) is
compared as the aggregator receives it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedsim.client.context import ClientContext
from fedsim.client.worker import ClientTask, ClientWorker
from fedsim.config import CompressionConfig
from fedsim.uplink import ClientUpload
from tests.client.conftest import BACKENDS
from tests.conftest import same_bits


def _correction(start: dict) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}


# name -> (the context from the starting adapter, client.compression, bitwise across backends)
ALGORITHMS = {
    "plain": (lambda start: None, "none", True),
    "scaffold": (lambda start: ClientContext(correction=_correction(start)), "none", True),
    "hetlora-rank": (lambda start: ClientContext(lora_rank=2), "none", True),
    "int8-upload": (lambda start: None, "int8", True),
    "topk-upload": (lambda start: None, "topk", True),
    "fedprox": (lambda start: ClientContext(prox_mu=0.5), "none", False),
    "all-at-once": (
        lambda start: ClientContext(prox_mu=0.5, correction=_correction(start), lora_rank=2),
        "none",
        False,
    ),
}


@pytest.fixture(scope="module")
def workers(spec):
    """`workers(compression)`: one ClientWorker per backend, built once per compression kind."""
    built: dict[str, dict[str, ClientWorker]] = {}

    def get(compression: str) -> dict[str, ClientWorker]:
        if compression not in built:
            built[compression] = {}
            for name, (backend, deepspeed) in BACKENDS.items():
                s = dataclasses.replace(
                    spec,
                    backend=backend,
                    settings=spec.settings.with_client(backend=backend, deepspeed=deepspeed),
                    compression=CompressionConfig(kind=compression, block_size=16),
                )
                built[compression][name] = ClientWorker(s)
        return built[compression]

    return get


def _train(worker: ClientWorker, start: dict, context: ClientContext | None):
    outcome, upload = worker.train(ClientTask(1, 2, 102), start, context)
    assert outcome.ok, outcome.error
    return outcome, upload


def _tensors(upload: ClientUpload) -> dict[str, torch.Tensor]:
    return {**upload.tensors, **{f"state/{k}": v for k, v in upload.client_state.items()}}


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_client_algorithm_gives_the_same_update_on_every_backend(workers, algorithm):
    make_context, compression, bitwise = ALGORITHMS[algorithm]
    by_backend = workers(compression)
    start = by_backend["torch"].initial_adapter()
    context = make_context(start)
    reference, reference_upload = _train(by_backend["torch"], start, context)
    expected = _tensors(reference_upload)
    for name, worker in by_backend.items():
        outcome, upload = _train(worker, start, context)
        got = _tensors(upload)
        assert got.keys() == expected.keys(), name
        if bitwise:
            assert outcome.losses == reference.losses, name
            for key in got:
                assert same_bits(got[key], expected[key]), (name, key)
        else:
            assert outcome.losses == pytest.approx(reference.losses, rel=1e-6), name
            for key in got:
                torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
    if algorithm != "plain":  # the algorithm did change the upload
        _, plain = _train(workers("none")["torch"], start, None)
        plain_tensors = _tensors(plain)
        assert plain_tensors.keys() != expected.keys() or any(
            not torch.equal(plain_tensors[k], v) for k, v in expected.items()
        )
