"""Strategies, selection, robust and private aggregation, compression and heterogeneous ranks,
end to end on a real local Ray instance with the tiny model.

Resume equality is checked for every strategy: a run interrupted after round 2 and resumed equals
the uninterrupted run bitwise (adapters, server state, SCAFFOLD's client variates). fedadam and
scaffold run by default; the other strategies are in the `slow` sweep.
"""

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsim import checkpoint
from fedsim.config import config_from_dict
from fedsim.driver import _eta, _round_line, run_experiment
from fedsim.server.privacy import dp_epsilon
from tests.conftest import assert_same_run_files, tiny_experiment

pytestmark = pytest.mark.ray

QUIET = {"log": lambda _: None, "show_progress": False}


def _run(raw: dict, **kwargs):
    return run_experiment(config_from_dict(raw), **QUIET, **kwargs)


def _round_dir(run_dir: Path, r: int) -> Path:
    return run_dir / "rounds" / checkpoint.round_name(r)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))  # a missing file fails the test, never compares as empty


def _info(run_dir: Path, r: int) -> dict:
    return json.loads((_round_dir(run_dir, r) / "round.json").read_text())


def _raw(tmp: Path, strategy: str, **sections) -> dict:
    server = {"strategy": strategy, **sections.pop("server", {})}
    if strategy in ("fedadagrad", "fedyogi", "fedadam"):
        server.setdefault("lr", 0.01)
    return tiny_experiment(
        tmp, run={"rounds": 3}, server=server, cluster={"num_workers": 1}, **sections
    )


def _interrupted_and_resumed(tmp: Path, strategy: str) -> tuple[Path, Path]:
    """(uninterrupted run dir, interrupted-after-round-2-and-resumed run dir), 3 rounds each."""
    straight = _run(_raw(tmp / "straight", strategy))
    raw = _raw(tmp / "split", strategy)
    raw["run"]["rounds"] = 2
    _run(raw)
    raw["run"]["rounds"] = 3
    resumed = _run(raw, resume=True)
    assert (resumed.first_round, resumed.last_round) == (3, 3)
    return straight.run_dir, resumed.run_dir


def _killed_after_round_two_and_resumed(tmp: Path, strategy: str) -> tuple[Path, Path]:
    """The same for a strategy without client state, in two runs instead of three: keep round 3
    of an uninterrupted run aside, remove it as if the driver died after round 2, resume."""
    run_dir = _run(_raw(tmp, strategy)).run_dir
    kept = tmp / "uninterrupted"
    _round_dir(kept, 3).parent.mkdir(parents=True)
    shutil.copytree(_round_dir(run_dir, 3), _round_dir(kept, 3))
    shutil.rmtree(_round_dir(run_dir, 3))
    checkpoint.write_text_atomic(run_dir / "latest", "round_0002\n")
    resumed = _run(_raw(tmp, strategy), resume=True)
    assert (resumed.first_round, resumed.last_round) == (3, 3)
    return kept, run_dir


def _assert_resume_equal(straight: Path, resumed: Path, strategy: str) -> None:
    rounds = [r for r in (1, 2, 3) if _round_dir(straight, r).exists()]  # kept aside: round 3
    assert_same_run_files(straight, resumed, rounds)
    stateful = strategy not in ("fedavg", "fedprox")
    assert (_round_dir(straight, 3) / "server_state.safetensors").exists() == stateful
    assert (straight / "clients").exists() == (strategy == "scaffold")
    adapters = [_tensors(_round_dir(resumed, r) / "adapter_model.safetensors") for r in (1, 2, 3)]
    for before, after in itertools.pairwise(adapters):  # the global adapter moved every round
        assert any(not torch.equal(before[k], after[k]) for k in before)
    info = _info(resumed, 3)
    assert info["aggregation"]["strategy"] == strategy
    assert info["selection"] == {"kind": "uniform", "requested": 3}


@pytest.mark.slow  # server-state resume stays in the default tier through SCAFFOLD's runs
def test_resume_equals_uninterrupted_fedadam(ray_local, tmp_path):
    straight, resumed = _killed_after_round_two_and_resumed(tmp_path, "fedadam")
    _assert_resume_equal(straight, resumed, "fedadam")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm", "fedadagrad", "fedyogi"])
def test_resume_equals_uninterrupted_every_strategy(ray_local, tmp_path, strategy):
    _assert_resume_equal(*_interrupted_and_resumed(tmp_path, strategy), strategy)


@pytest.fixture(scope="module")
def scaffold_runs(ray_local, tmp_path_factory):
    return _interrupted_and_resumed(tmp_path_factory.mktemp("scaffold"), "scaffold")


def test_resume_equals_uninterrupted_scaffold(scaffold_runs):
    _assert_resume_equal(*scaffold_runs, "scaffold")


def test_scaffold_state_only_for_clients_that_trained_and_never_skipped(scaffold_runs):
    """Variate files exist only for clients that trained. Falling back past a damaged round would
    reuse variates written after it: refused, naming the file and round, before any write."""
    from fedsim.errors import FedsimInputError

    run_dir = scaffold_runs[0]
    trained = {c for r in (1, 2, 3) for c in _info(run_dir, r)["aggregation"]["accepted"]}
    files = {int(p.name.split(".")[0]) for p in (run_dir / "clients").iterdir()}
    assert files == trained and len(trained) <= 6
    state = _tensors(_round_dir(run_dir, 3) / "server_state.safetensors")
    assert state and all(k.startswith("c/") for k in state)
    assert any(float(v.abs().sum()) > 0 for v in state.values())

    adapter = _round_dir(run_dir, 3) / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-4])
    before = {p.name: p.read_bytes() for p in (run_dir / "clients").iterdir()}
    raw = _raw(run_dir.parents[1], "scaffold")
    raw["run"]["rounds"] = 4
    with pytest.raises(FedsimInputError, match="written by round 3, after the resume point"):
        _run(raw, resume=True)
    assert {p.name: p.read_bytes() for p in (run_dir / "clients").iterdir()} == before


def test_scaffold_object_store_bytes_count_contexts_and_client_state(scaffold_runs):
    """SCAFFOLD moves more than FedAvg: each client also uploads its variate and is sent its
    correction c - c_i (both float32, shaped like the adapter); object_store_bytes counts both."""
    run_dir = scaffold_runs[0]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        info = _info(run_dir, m["round"])
        adapter, n = info["bytes"]["adapter"], len(info["clients"])
        assert info["bytes_downlink"] == n * adapter
        assert m["uplink_bytes"] == n * 2 * adapter  # the adapter and the variate
        assert m["object_store_bytes"] == info["object_store_bytes"] == n * 4 * adapter


@pytest.fixture(scope="module")
def features_run(ray_local, tmp_path_factory):
    """FedProx with availability from a profile (client 0 never available, clients 1 and 2 of
    rank 2), int8 uplink compression, and the coordinate-wise median."""
    tmp = tmp_path_factory.mktemp("features")
    profile = tmp / "profile.yaml"
    profile.write_text(
        "classes: {small: {lora_rank: 2}}\n"
        "default: {availability: 1.0}\n"
        "clients: {0: {availability: 0.0}, 1: small, 2: small}\n"
    )
    raw = _raw(
        tmp,
        "fedprox",
        server={"selection": "availability", "robust": {"rule": "median"}, "prox_mu": 0.1},
        client={
            "profile": str(profile),
            "compression": {"kind": "int8", "block_size": 64},
        },
    )
    raw["run"]["rounds"] = 2
    return _run(raw)


def test_availability_ranks_compression_and_median_on_ray(features_run):
    run_dir = features_run.run_dir
    raw_bytes = _info(run_dir, 1)["bytes"]["adapter"]
    for r in (1, 2):
        info = _info(run_dir, r)
        assert info["selection"] == {"kind": "availability", "requested": 3, "available": 5}
        assert 0 not in info["clients"] and len(info["clients"]) == 3
        agg = info["aggregation"]
        assert agg["accepted"] == info["clients"] and agg["robust"] == {"rule": "median"}
        by_client = {int(c): b for c, b in info["bytes"]["uplink_by_client"].items()}
        for c, b in by_client.items():
            # int8: a quarter of the float32 adapter plus one scale per block; rank 2 of 4 halves it
            expected = raw_bytes // 4 // 2 if c in (1, 2) else raw_bytes // 4
            assert expected < b < expected * 1.2, (c, b, expected)
        assert info["bytes"]["uplink"] == sum(by_client.values())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["uplink_bytes"] for m in metrics] == [
        _info(run_dir, r)["bytes"]["uplink"] for r in (1, 2)
    ]
    assert all(m["train_loss"] > 0 for m in metrics)


def test_dp_round_robin_reports_epsilon_every_round(ray_local, tmp_path):
    raw = _raw(
        tmp_path,
        "fedavgm",
        server={
            "selection": "round_robin",
            "weighting": "uniform",
            "dp": {"enabled": True, "clip_norm": 0.05, "noise_multiplier": 0.8, "delta": 1e-4},
        },
    )
    raw["run"]["rounds"] = 2
    result = _run(raw)
    metrics = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for r, m in zip((1, 2), metrics, strict=True):
        info = _info(result.run_dir, r)
        assert info["clients"] == [[0, 1, 2], [3, 4, 5]][r - 1]
        expected = dp_epsilon(0.8, r, 1e-4, 6, None)
        assert info["dp"]["epsilon"] == pytest.approx(expected) == m["epsilon"]
        assert info["dp"]["sampling"] == "none (every round counted in full)"
        assert all(n >= 0 for n in info["aggregation"]["update_norms"].values())
    assert metrics[0]["epsilon"] < metrics[1]["epsilon"]


def test_round_line_names_rejected_clients_and_a_kept_adapter():
    record = {
        "round": 4,
        "num_clients": 3,
        "samples": 30,
        "train_loss": 1.5,
        "seconds": 2.0,
        "rejected": {"2": "lora_A: non-finite values"},
        "kept_previous_adapter": True,
        "epsilon": 1.25,
    }
    line = _round_line(record, 10, [])
    assert "rejected client 2: lora_A: non-finite values" in line
    assert "no update applied: kept the previous adapter" in line
    assert line.endswith("epsilon 1.250")


def test_round_line_eta_is_the_recent_pace_times_the_rounds_left():
    record = {"round": 4, "seconds": 2.0}

    assert _eta([10.0], record, 10) == " | eta 12 s"  # first round: its own 2 s, 6 rounds left
    assert _eta([0.0, 30.0, 60.0], record, 10) == " | eta 3 min 0 s"  # 30 s a round
    slow_start = [0.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]  # the last 5 rounds took 10 s each
    assert _eta(slow_start, record, 10) == " | eta 1 min 0 s"
    assert _eta([0.0, 5.0], {"round": 10, "seconds": 5.0}, 10) == ""  # the last round
