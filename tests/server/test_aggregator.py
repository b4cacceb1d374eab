"""The aggregator writes each round's checkpoint in the background, off the critical path."""

import errno
import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from fedsim import checkpoint, rundir
from fedsim.checkpoint import CheckpointWriteError
from fedsim.config import ClusterConfig, ExperimentConfig, ServerConfig
from fedsim.server.aggregator import Aggregator


def _aggregator(tmp_path, overlap: bool = True) -> Aggregator:
    cfg = ExperimentConfig(
        server=ServerConfig(clients_per_round=2),
        cluster=ClusterConfig(overlap_checkpoints=overlap),
    )
    agg = Aggregator(str(tmp_path), cfg, {"r": 2}, {"config_hash": "test"})
    agg.set_global({"w": torch.zeros(2, 3)})
    return agg


def _round(agg: Aggregator, round_idx: int, value: float) -> dict:
    agg.begin_round({0: 1, 1: 3}, round_idx)
    agg.fold(0, {"w": torch.full((2, 3), value)})
    agg.fold(1, {"w": torch.full((2, 3), 2 * value)})
    summary, _ = agg.finish_round(round_idx, {"round": round_idx})
    return summary


def _saved(tmp_path, round_idx: int) -> torch.Tensor:
    path = tmp_path / "rounds" / checkpoint.round_name(round_idx) / checkpoint.ADAPTER_FILE
    return load_file(str(path))["w"]


def test_each_round_reports_the_previous_checkpoint_once_it_is_on_disk(tmp_path):
    agg = _aggregator(tmp_path)
    first = _round(agg, 1, 0.4)
    assert first["checkpoints_written"] == []
    assert "merged_stack" not in first["bytes"]  # FLoRA's alone
    written = _round(agg, 2, 0.8)["checkpoints_written"]
    assert [w["round"] for w in written] == [1]
    assert written[0]["checkpoint_seconds"] > 0
    assert torch.allclose(_saved(tmp_path, 1), torch.full((2, 3), 0.7))  # (0.4 + 3 * 0.8) / 4

    assert [w["round"] for w in agg.flush()] == [2]
    assert agg.flush() == []
    assert torch.allclose(_saved(tmp_path, 2), torch.full((2, 3), 1.4))  # the adapters themselves
    assert (tmp_path / checkpoint.LATEST_FILE).read_text().strip() == "round_0002"
    assert checkpoint.verify_round(tmp_path / "rounds" / "round_0002") is None


def test_the_next_round_trains_while_the_checkpoint_is_still_being_written(tmp_path, monkeypatch):
    release, writing = threading.Event(), threading.Event()
    real_save = rundir.save_tensors

    def slow_disk(path, tensors, metadata=None):
        writing.set()
        assert release.wait(10), "never released"
        real_save(path, tensors, metadata)

    monkeypatch.setattr(rundir, "save_tensors", slow_disk)
    agg = _aggregator(tmp_path)
    _round(agg, 1, 0.4)  # returns although the disk has not finished round 1
    assert writing.wait(10)
    assert not (tmp_path / "rounds" / "round_0001").exists()

    agg.begin_round({0: 1, 1: 3}, 2)  # round 2 folds meanwhile
    agg.fold(0, {"w": torch.full((2, 3), 0.8)})
    agg.fold(1, {"w": torch.full((2, 3), 1.6)})
    release.set()
    summary, new = agg.finish_round(2, {"round": 2})  # waits for round 1 first
    assert [w["round"] for w in summary["checkpoints_written"]] == [1]
    agg.flush()
    info = json.loads((tmp_path / "rounds/round_0001/round.json").read_text())
    assert info["round"] == 1 and "checkpoints_written" not in info
    assert torch.equal(_saved(tmp_path, 2), new["w"])


def test_without_overlap_the_round_is_on_disk_when_finish_round_returns(tmp_path):
    agg = _aggregator(tmp_path, overlap=False)
    written = _round(agg, 1, 0.4)["checkpoints_written"]
    assert [w["round"] for w in written] == [1]
    assert written[0]["checkpoint_wait_seconds"] == written[0]["checkpoint_seconds"]
    assert (tmp_path / "rounds" / "round_0001").is_dir()


def test_a_failed_background_write_surfaces_at_the_next_call(tmp_path, monkeypatch):
    def full_disk(path, tensors, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    agg = _aggregator(tmp_path)
    _round(agg, 1, 0.4)
    _round(agg, 2, 0.8)
    agg.flush()
    monkeypatch.setattr(rundir, "save_tensors", full_disk)
    _round(agg, 3, 0.2)  # the write fails in the background ...
    with pytest.raises(CheckpointWriteError, match=r"round 3: .*round_0003\.tmp"):
        agg.flush()  # ... and is reported here, naming the round and the path
    assert (tmp_path / checkpoint.LATEST_FILE).read_text().strip() == "round_0002"
    assert not (tmp_path / "rounds" / ".round_0003.tmp").exists()


def test_the_round_is_bitwise_the_same_whatever_the_fold_threads(tmp_path):
    """`cluster.aggregator_threads` splits each update's elements between threads; the exact
    fold makes the global adapter the same bits for any number of them."""
    gen = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(300, 700, generator=gen), "b": torch.randn(70_000, generator=gen)}
    updates = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}]
    updates.append({k: v - 0.02 * torch.randn(v.shape, generator=gen) for k, v in start.items()})

    def global_after_a_round(threads: int):
        cfg = ExperimentConfig(
            server=ServerConfig(clients_per_round=2),
            cluster=ClusterConfig(aggregator_threads=threads, overlap_checkpoints=False),
        )
        agg = Aggregator(str(tmp_path / f"t{threads}"), cfg, {"r": 2}, {})
        agg.set_global(start)
        agg.begin_round({0: 5, 1: 9}, 1)
        for client, update in zip((1, 0), reversed(updates), strict=True):
            agg.fold(client, update)
        return agg.finish_round(1, {"round": 1})[1]

    one, three = global_after_a_round(1), global_after_a_round(3)
    assert all(torch.equal(one[k], three[k]) for k in start)
    assert not torch.equal(one["a"], start["a"])  # the round did move the adapter
