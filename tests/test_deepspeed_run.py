"""`client.backend: deepspeed` end to end on a real local Ray: each worker builds its DeepSpeed
engine once and serves several clients with it; the rounds' adapters equal the torch backend's."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedsim.config import config_from_dict
from fedsim.driver import run_experiment
from tests.conftest import tiny_experiment

pytestmark = pytest.mark.ray

ZERO2 = {"zero_optimization": {"stage": 2}}


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """The same two rounds (3 clients each on 2 workers) with each backend."""
    results = {}
    for backend, deepspeed in (("torch", None), ("deepspeed", ZERO2)):
        tmp = tmp_path_factory.mktemp(backend)
        client = {"backend": backend, "deepspeed": deepspeed}
        cfg = config_from_dict(tiny_experiment(tmp, client=client))
        results[backend] = run_experiment(cfg, log=lambda _: None, show_progress=False)
    return results


def _round(run_dir, r):
    path = run_dir / "rounds" / f"round_{r:04d}"
    return load_file(path / "adapter_model.safetensors"), json.loads(
        (path / "round.json").read_text()
    )


def test_deepspeed_rounds_match_the_torch_backend(runs):
    for r in (1, 2):
        ds_adapter, ds_info = _round(runs["deepspeed"].run_dir, r)
        torch_adapter, torch_info = _round(runs["torch"].run_dir, r)
        assert ds_info["aggregation"]["rejected"] == {}
        assert ds_adapter.keys() == torch_adapter.keys()
        for key in ds_adapter:
            torch.testing.assert_close(ds_adapter[key], torch_adapter[key], rtol=1e-5, atol=1e-7)
        ds_losses = [c["mean_loss"] for c in ds_info["client_results"]]
        torch_losses = [c["mean_loss"] for c in torch_info["client_results"]]
        assert ds_losses == pytest.approx(torch_losses, rel=1e-6)


def test_a_deepspeed_worker_serves_several_clients(runs):
    """3 clients per round on 2 workers: some worker trained two clients on one engine."""
    served: dict[str, int] = {}
    for r in (1, 2):
        _, info = _round(runs["deepspeed"].run_dir, r)
        for c in info["client_results"]:
            assert c["ok"] and c["node"]
            served[c["worker"]] = served.get(c["worker"], 0) + 1
    assert len(served) == 2 and max(served.values()) >= 2
