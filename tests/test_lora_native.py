"""FFA-LoRA, FedSA-LoRA, FlexLoRA and FLoRA end to end on a real local Ray instance with the tiny
model: what each keeps fixed or per client; FedSA-LoRA's and FLoRA's bitwise resume after a
SIGKILL of the driver (client-kept B factors commit with their round, like SCAFFOLD's variates;
FLoRA's merged base delta is server state); FLoRA's rounds as `fedsim eval` and PEFT load them;
FlexLoRA's resume with clients of mixed ranks.

The closed forms are unit-tested in tests/server/test_lora_native_aggregation.py; both backends
train them alike, bit for bit, in tests/client/test_backends.py."""

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from fedsim import checkpoint
from fedsim.config import config_from_dict
from fedsim.driver import RunResult, run_experiment
from tests.conftest import assert_same_run_files, tiny_experiment
from tests.faults.test_driver_faults import _uninterrupted, sigkill_driver_mid_round_two

pytestmark = pytest.mark.ray

FEDSA = {"run": {"rounds": 2}, "server": {"strategy": "fedsa_lora"}}


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
    for r in (1, 2):
        for c in _info(run_dir, r)["aggregation"]["accepted"]:
            last_round[str(c)] = r
    files = sorted(p.stem for p in (run_dir / "clients").glob("*.safetensors"))
    assert files == sorted(last_round)
    for c, r in last_round.items():
        with safe_open(str(run_dir / "clients" / f"{c}.safetensors"), "pt") as f:
            assert f.metadata()["round"] == str(r)
            assert all("lora_B" in k for k in f.keys())  # noqa: SIM118 (safe_open has no iter)

    weights = _info(run_dir, 2)["aggregation"]["weights"]
    kept = {c: load_file(str(run_dir / "clients" / f"{c}.safetensors")) for c in weights}
    total = sum(weights.values())
    global_b = {k: v for k, v in _adapter(run_dir, 2).items() if "lora_B" in k}
    for key, value in global_b.items():
        mean = sum(n * kept[c][key].double() for c, n in weights.items()) / total
        # the exact fixed-point mean (2^-50) rounded to float32
        torch.testing.assert_close(value.double(), mean, rtol=0, atol=1e-7)
    a1, a2 = _adapter(run_dir, 1), _adapter(run_dir, 2)
    assert any(not torch.equal(a1[k], a2[k]) for k in a1 if "lora_A" in k)


@pytest.mark.slow  # ~60-110 s; its client-state store is SCAFFOLD's, SIGKILL-tested by default
def test_fedsa_lora_driver_killed_mid_round_then_resumed_byte_identical(
    fedsa_reference, experiment_file, tmp_path
):
    """SIGKILL of the driver while round 2 trains, then --resume: every round's files and every
    client's kept B are byte-identical to the uninterrupted run's."""
    config = experiment_file(**FEDSA)
    run_dir = tmp_path / "runs" / "t"
    sigkill_driver_mid_round_two(config, run_dir, tmp_path)
    assert any((run_dir / "clients").glob("*.safetensors"))  # round 1's B's were committed

    cfg = config_from_dict(yaml.safe_load(config.read_text()))
    result = run_experiment(cfg, resume=True, log=lambda _: None, show_progress=False)
    assert (result.first_round, result.last_round) == (2, 2)
    assert_same_run_files(fedsa_reference.run_dir, run_dir, [1, 2])


@pytest.fixture(scope="module")
def flexlora_runs(ray_local, tmp_path_factory) -> tuple[Path, Path]:
    """FlexLoRA, global rank 4, clients 1 and 2 of rank 2, 3 rounds; then round 3 is kept aside,
    removed as if the driver had died after round 2, and redone by --resume. Returns (the run
    directory, the folder holding the uninterrupted round 3)."""
    tmp = tmp_path_factory.mktemp("flexlora")
    profile = tmp / "profile.yaml"
    profile.write_text("classes: {small: {lora_rank: 2}}\nclients: {1: small, 2: small}\n")
    raw = tiny_experiment(
        tmp,
        run={"rounds": 3},
        server={"strategy": "flexlora", "selection": "all"},
        client={"profile": str(profile)},
        cluster={"num_workers": 1},
    )
    run_dir = run_experiment(config_from_dict(raw), log=lambda _: None, show_progress=False).run_dir
    kept = tmp / "uninterrupted"
    shutil.copytree(run_dir / "rounds/round_0003", kept / "rounds/round_0003")
    shutil.rmtree(run_dir / "rounds/round_0003")
    checkpoint.write_text_atomic(run_dir / "latest", "round_0002\n")
    resumed = run_experiment(
        config_from_dict(raw), resume=True, log=lambda _: None, show_progress=False
    )
    assert (resumed.first_round, resumed.last_round) == (3, 3)
    return run_dir, kept


@pytest.mark.slow  # ~30-50 s (one run and a redone round); tests/server covers the arithmetic
def test_flexlora_adapters_are_truncated_svds_and_resume_bitwise(flexlora_runs):
    """Every round's adapter is in SVD form: B's columns and A's rows orthogonal, the j-th
    column of B as long as the j-th row of A (the singular value split evenly), in decreasing
    order; a lower-rank client's components are a prefix of them. Round 3 redone after the
    restart is byte-identical."""
    run_dir, kept = flexlora_runs
    assert_same_run_files(kept, run_dir, [3])
    for r in (1, 2, 3):
        adapter = _adapter(run_dir, r)
        assert _info(run_dir, r)["aggregation"]["strategy"] == "flexlora"
        for a_key in (k for k in adapter if "lora_A" in k):
            a, b = adapter[a_key].double(), adapter[a_key.replace("lora_A", "lora_B")].double()
            gram_a, gram_b = a @ a.T, b.T @ b
            scale = float(gram_a.diagonal().max())
            off = ~torch.eye(4, dtype=torch.bool)
            assert float(gram_a[off].abs().max()) < 1e-5 * scale
            assert float(gram_b[off].abs().max()) < 1e-5 * scale
            torch.testing.assert_close(gram_a.diagonal(), gram_b.diagonal(), rtol=1e-4, atol=0)
            sv = gram_a.diagonal()
            assert bool((sv[:-1] >= sv[1:] * (1 - 1e-5)).all())


FLORA = {"run": {"rounds": 3}, "server": {"strategy": "flora"}}


@pytest.fixture(scope="module")
def flora_reference(ray_local, tmp_path_factory) -> RunResult:
    """3 rounds of FLoRA; round 3 is then kept aside, removed as if the driver had died after
    round 2 (workers and aggregator gone, the merged delta only on disk), and redone by
    --resume (the SIGKILL test, slow, kills mid-round instead)."""
    tmp = tmp_path_factory.mktemp("flora")
    result = _uninterrupted(tmp, **FLORA)
    run_dir, kept = result.run_dir, tmp / "uninterrupted"
    shutil.copytree(run_dir / "rounds/round_0003", kept / "rounds/round_0003")
    shutil.rmtree(run_dir / "rounds/round_0003")
    checkpoint.write_text_atomic(run_dir / "latest", "round_0002\n")
    cfg = config_from_dict(tiny_experiment(tmp, **FLORA))
    resumed = run_experiment(cfg, resume=True, log=lambda _: None, show_progress=False)
    assert (resumed.first_round, resumed.last_round) == (3, 3)
    result.kept_round_3 = kept  # type: ignore[attr-defined]
    return result


@pytest.mark.slow  # the FLoRA run (~30 s with its redone round); tests/server: its arithmetic
def test_flora_resumed_round_is_byte_identical(flora_reference):
    assert_same_run_files(flora_reference.kept_round_3, flora_reference.run_dir, [3])
    assert (flora_reference.run_dir / "rounds/round_0003/server_state.safetensors").is_file()


def _server_state(run_dir: Path, r: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"rounds/round_{r:04d}/server_state.safetensors"))


@pytest.mark.slow  # the FLoRA run (~30 s with its redone round); tests/server: its arithmetic
def test_flora_rounds_merge_into_the_base_and_start_from_fresh_factors(flora_reference):
    run_dir = flora_reference.run_dir
    merged = [_server_state(run_dir, r) for r in (1, 2, 3)]
    # one float64 delta per adapted base weight: 2 layers x (q_proj, v_proj)
    assert sorted(merged[0]) == sorted(
        f"base_delta/model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in "qv"
    )
    for before, after in itertools.pairwise(merged):  # every round merged more
        assert all(not torch.equal(before[k], after[k]) for k in before)
    adapters = [_adapter(run_dir, r) for r in (1, 2, 3)]
    for adapter in adapters:  # the next round's fresh factors: B zero, A seeded per round
        assert all(not v.any() for k, v in adapter.items() if "lora_B" in k)
    a_key = next(k for k in adapters[0] if "lora_A" in k)
    assert not torch.equal(adapters[0][a_key], adapters[1][a_key])


@pytest.mark.slow  # the FLoRA run (~30 s with its redone round); tests/server: its arithmetic
def test_flora_round_loads_in_fedsim_eval_and_outside_it_alike(flora_reference):
    """`fedsim eval`'s model of round 3 (base + merged delta, fresh adapter) gives the logits of
    the recipe in docs/lora-native.md: add the delta to the base weights, attach the round's
    adapter with PEFT."""
    from peft import PeftModel

    from fedsim.eval.job import ModelPool, load_adapter, open_run
    from fedsim.model import load_base_model, load_tokenizer

    run_dir = flora_reference.run_dir
    run = open_run(run_dir)
    adapter, _ = load_adapter(run, 3)
    assert sum(k.startswith("base_delta/") for k in adapter) == 4
    answer_model = ModelPool().get(run.cfg)
    answer_model.use_adapter(adapter)

    round_dir = run_dir / "rounds/round_0003"
    base_path = json.loads((round_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    base = load_base_model(base_path)
    for key, delta in _server_state(run_dir, 3).items():
        weight = base.get_parameter(key.removeprefix("base_delta/"))
        weight.data = (weight.data.double() + delta).to(weight.dtype)
    outside = PeftModel.from_pretrained(base, str(round_dir)).eval()

    inputs = load_tokenizer(base_path)(["Below is an instruction"], return_tensors="pt")
    with torch.no_grad():
        ours = answer_model.model(**inputs.to(answer_model.device)).logits.cpu()
        theirs = outside(**inputs).logits
        answer_model.use_adapter(None)  # the base alone: the merge is undone
        plain = answer_model.model(**inputs.to(answer_model.device)).logits.cpu()
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, plain)


@pytest.mark.slow  # ~60-110 s: a CLI run with its own Ray; the fixture resumes in-process
def test_flora_driver_killed_mid_round_then_resumed_byte_identical(
    flora_reference, experiment_file, tmp_path
):
    """SIGKILL of the driver while round 2 trains (workers hold round 1's merged base), then
    --resume: every round's adapter and merged base delta are byte-identical."""
    config = experiment_file(**FLORA)
    run_dir = tmp_path / "runs" / "t"
    sigkill_driver_mid_round_two(config, run_dir, tmp_path)

    cfg = config_from_dict(yaml.safe_load(config.read_text()))
    result = run_experiment(cfg, resume=True, log=lambda _: None, show_progress=False)
    assert (result.first_round, result.last_round) == (2, 3)
    assert_same_run_files(flora_reference.run_dir, run_dir, [1, 2, 3])
