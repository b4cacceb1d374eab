"""FFA-LoRA and FedSA-LoRA end to end on a real local Ray instance with the tiny model: what each
keeps fixed or per client, and FedSA-LoRA's bitwise resume after a SIGKILL of the driver (its
client-kept B factors commit with their round, like SCAFFOLD's variates).

The closed forms are unit-tested in tests/server/test_lora_native.py; both backends train them
alike, bit for bit, in tests/client/test_backends.py."""

import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from fedsim.config import config_from_dict
from fedsim.driver import RunResult, run_experiment
from tests.conftest import assert_same_run_files
from tests.faults.test_driver_faults import (
    _start_cli,
    _uninterrupted,
    _wait_mid_round_two,
    _wait_until_gone,
)

pytestmark = pytest.mark.ray

FEDSA = {"run": {"rounds": 3}, "server": {"strategy": "fedsa_lora"}}


def _adapter(run_dir: Path, r: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"rounds/round_{r:04d}/adapter_model.safetensors"))


def _info(run_dir: Path, r: int) -> dict:
    return json.loads((run_dir / f"rounds/round_{r:04d}/round.json").read_text())


@pytest.fixture(scope="module")
def fedsa_reference(ray_local, tmp_path_factory) -> RunResult:
    return _uninterrupted(tmp_path_factory.mktemp("fedsa"), **FEDSA)


@pytest.mark.slow  # ~20-35 s; the unit tests cover it (aggregator with DP, both backends)
def test_ffa_lora_never_moves_a(ray_local, tmp_path):
    result = _uninterrupted(tmp_path, server={"strategy": "ffa_lora"})
    first, second = _adapter(result.run_dir, 1), _adapter(result.run_dir, 2)
    a_keys = [k for k in first if "lora_A" in k]
    b_keys = [k for k in first if "lora_B" in k]
    assert a_keys and b_keys
    assert all(torch.equal(first[k], second[k]) for k in a_keys)  # the seeded initial A
    assert all(first[k].abs().sum() > 0 for k in b_keys)  # B left its zero initialisation
    assert any(not torch.equal(first[k], second[k]) for k in b_keys)
    assert _info(result.run_dir, 2)["aggregation"]["strategy"] == "ffa_lora"


def test_fedsa_lora_keeps_each_clients_b_and_averages_the_round(fedsa_reference):
    """Every client that trained has its B under clients/, written by the last round it trained
    in; the round's global B is the sample-weighted mean of the B's its clients kept."""
    run_dir = fedsa_reference.run_dir
    last_round: dict[str, int] = {}
    for r in (1, 2, 3):
        for c in _info(run_dir, r)["aggregation"]["accepted"]:
            last_round[str(c)] = r
    files = sorted(p.stem for p in (run_dir / "clients").glob("*.safetensors"))
    assert files == sorted(last_round)
    for c, r in last_round.items():
        with safe_open(str(run_dir / "clients" / f"{c}.safetensors"), "pt") as f:
            assert f.metadata()["round"] == str(r)
            assert all("lora_B" in k for k in f.keys())  # noqa: SIM118 (safe_open has no iter)

    weights = _info(run_dir, 3)["aggregation"]["weights"]
    kept = {c: load_file(str(run_dir / "clients" / f"{c}.safetensors")) for c in weights}
    total = sum(weights.values())
    global_b = {k: v for k, v in _adapter(run_dir, 3).items() if "lora_B" in k}
    for key, value in global_b.items():
        mean = sum(n * kept[c][key].double() for c, n in weights.items()) / total
        # the exact fixed-point mean (2^-50) rounded to float32
        torch.testing.assert_close(value.double(), mean, rtol=0, atol=1e-7)
    a2, a3 = _adapter(run_dir, 2), _adapter(run_dir, 3)
    assert any(not torch.equal(a2[k], a3[k]) for k in a2 if "lora_A" in k)


def test_fedsa_lora_driver_killed_mid_round_then_resumed_byte_identical(
    fedsa_reference, experiment_file, tmp_path
):
    """SIGKILL of the driver while round 2 trains, then --resume: every round's files and every
    client's kept B are byte-identical to the uninterrupted run's."""
    config = experiment_file(**FEDSA)
    run_dir, hold = tmp_path / "runs" / "t", tmp_path / "round2-reached"
    ray_tmp = tempfile.mkdtemp(prefix="fsa", dir="/tmp")
    proc = _start_cli(config, ray_tmp, hold)
    _wait_mid_round_two(run_dir, hold, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in _wait_until_gone(ray_tmp, 10):  # SIGKILL leaves Ray no chance to clean up
        os.kill(pid, signal.SIGKILL)
    assert any((run_dir / "clients").glob("*.safetensors"))  # round 1's B's were committed

    cfg = config_from_dict(yaml.safe_load(config.read_text()))
    result = run_experiment(cfg, resume=True, log=lambda _: None, show_progress=False)
    assert (result.first_round, result.last_round) == (2, 3)
    assert_same_run_files(fedsa_reference.run_dir, run_dir, [1, 2, 3])
