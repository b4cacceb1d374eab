"""Round checkpoints: the exact file set, integrity checks, fallback, and failed writes."""

import errno
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsim import checkpoint, rundir
from fedsim.checkpoint import CheckpointWriteError


def _write(run_dir, round_idx, value, state=None):
    adapter = {"layer.lora_A.weight": torch.full((2, 3), float(value))}
    return checkpoint.write_round(
        run_dir, round_idx, adapter, {"r": 2}, state or {}, {"clients": [1, 2]}
    )


def test_round_directory_holds_exactly_the_contract_files(tmp_path):
    path = _write(tmp_path, 1, 1.0)
    assert path == tmp_path / "rounds" / "round_0001"
    assert {p.name for p in path.iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "round.json",
    }
    with_state = _write(tmp_path, 2, 2.0, state={"momentum": torch.ones(3)})
    assert (with_state / "server_state.safetensors").is_file()
    assert (tmp_path / "latest").read_text() == "round_0002\n"
    info = json.loads((with_state / "round.json").read_text())
    assert info["round"] == 2 and info["clients"] == [1, 2]
    assert set(info["files"]) == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "server_state.safetensors",
    }
    assert not list((tmp_path / "rounds").glob(".*"))  # no temporary left behind


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-4])


def _flip_last_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _drop_file_list(path: Path) -> None:
    info = json.loads(path.read_text())
    del info["files"]
    path.write_text(json.dumps(info))


DAMAGES = {
    # name: (file damaged, how, a word the reason must use)
    "adapter truncated": ("adapter_model.safetensors", _truncate, "sha256"),
    "adapter bit flipped": ("adapter_model.safetensors", _flip_last_bit, "sha256"),
    "adapter deleted": ("adapter_model.safetensors", Path.unlink, "missing"),
    "server state deleted": ("server_state.safetensors", Path.unlink, "missing"),
    "server state bit flipped": ("server_state.safetensors", _flip_last_bit, "sha256"),
    "adapter config truncated": ("adapter_config.json", _truncate, "sha256"),
    "round.json not JSON": ("round.json", lambda p: p.write_text("{not json"), "unreadable"),
    "round.json deleted": ("round.json", Path.unlink, "missing"),
    "round.json without its file list": ("round.json", _drop_file_list, "unreadable"),
}


@pytest.mark.parametrize(("name", "damage", "word"), DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_round_is_named_and_resume_falls_back(
    tmp_path: Path, name: str, damage: Callable[[Path], object], word: str
) -> None:
    _write(tmp_path, 1, 1.0, state={"momentum": torch.full((3,), 1.0)})
    newest = _write(tmp_path, 2, 2.0, state={"momentum": torch.full((3,), 2.0)})
    assert name in json.loads((newest / "round.json").read_text())["files"] or name == "round.json"
    target = newest / name
    damage(target)

    reason = checkpoint.verify_round(newest)
    assert reason is not None and str(target) in reason and word in reason, reason
    messages: list[str] = []
    found = checkpoint.find_resume_point(tmp_path, messages.append)
    assert messages == [f"resume: skipping round_0002: {reason}"]
    assert found is not None and found.round_idx == 1
    assert torch.equal(found.adapter["layer.lora_A.weight"], torch.ones(2, 3))
    assert torch.equal(found.server_state["momentum"], torch.ones(3))


@pytest.mark.parametrize(
    ("code", "words"), [(errno.ENOSPC, "No space left"), (errno.EACCES, "Permission denied")]
)
def test_failed_write_keeps_the_previous_round_and_names_the_path(
    tmp_path, monkeypatch, code, words
):
    _write(tmp_path, 1, 1.0)
    before = (tmp_path / "rounds/round_0001/adapter_model.safetensors").read_bytes()

    def failing_save(path, tensors, metadata=None):
        raise OSError(code, words, str(path))  # the disk, as a full or read-only one answers

    monkeypatch.setattr(rundir, "save_tensors", failing_save)  # what checkpoint writes with
    with pytest.raises(CheckpointWriteError) as info:
        _write(tmp_path, 2, 2.0)
    message = str(info.value)
    assert "round 2" in message and ".round_0002.tmp/adapter_model.safetensors" in message
    assert words in message

    assert (tmp_path / "latest").read_text() == "round_0001\n"
    assert checkpoint.list_rounds(tmp_path) == [1]
    assert not list((tmp_path / "rounds").glob(".*"))
    assert (tmp_path / "rounds/round_0001/adapter_model.safetensors").read_bytes() == before
    loaded = load_file(tmp_path / "rounds/round_0001/adapter_model.safetensors")
    assert torch.equal(loaded["layer.lora_A.weight"], torch.ones(2, 3))


def test_a_redone_round_replaces_the_old_directory(tmp_path):
    _write(tmp_path, 1, 1.0)
    _write(tmp_path, 1, 5.0)
    found = checkpoint.find_resume_point(tmp_path)
    assert found is not None
    assert torch.equal(found.adapter["layer.lora_A.weight"], torch.full((2, 3), 5.0))


def test_metrics_are_truncated_to_the_resume_point(tmp_path):
    for r in (1, 2, 3):
        checkpoint.append_metrics(tmp_path, {"round": r})
    checkpoint.truncate_metrics(tmp_path, 2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]


def test_a_half_written_round_left_by_a_crash_is_ignored_and_replaced(tmp_path):
    _write(tmp_path, 1, 1.0)
    stale = tmp_path / "rounds" / ".round_0002.tmp"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    assert checkpoint.list_rounds(tmp_path) == [1]
    _write(tmp_path, 2, 2.0)
    assert not stale.exists()
    assert checkpoint.verify_round(tmp_path / "rounds" / "round_0002") is None
