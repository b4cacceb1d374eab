"""Run-directory I/O: atomic, umask-respecting, byte-deterministic writes and safe locations."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsim import rundir

METADATA = {f"key{i}": f"value{i}" for i in range(8)}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.lora_B.weight": torch.randn(4, 3, generator=g),
        "a.lora_A.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "c.count": torch.arange(7, dtype=torch.int64),
        "d.flags": torch.tensor([True, False]),
        "e.half": torch.tensor([-0.0, 1.5], dtype=torch.float16),
        "f.empty": torch.zeros(0, 2),
    }


def test_tensor_files_load_with_safetensors_and_keep_every_bit(tmp_path: Path) -> None:
    tensors = _tensors()
    rundir.save_tensors(tmp_path / "t.safetensors", tensors, {"round": "3"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert back[name].view(-1).view(torch.uint8).tolist() == (
            tensor.view(-1).view(torch.uint8).tolist()
        ), name  # bytes, so -0.0 and +0.0 differ


_WRITE = """
import sys, torch
from fedsim import rundir
sys.path.insert(0, {tests!r})
from test_rundir import METADATA, _tensors
sys.stdout.buffer.write(rundir.tensor_bytes(_tensors(), METADATA))
"""


def test_tensor_bytes_are_the_same_in_every_process() -> None:
    # The safetensors library writes __metadata__ in hash-map order, which changes between
    # processes; eight keys over four processes would show that almost surely.
    code = _WRITE.format(tests=str(Path(__file__).parent))
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
        for _ in range(4)
    }
    assert len(outputs) == 1
    assert outputs == {rundir.tensor_bytes(_tensors(), METADATA)}


def test_header_keys_are_sorted() -> None:
    data = rundir.tensor_bytes(_tensors(), METADATA)
    size = int.from_bytes(data[:8], "little")
    assert size % 8 == 0
    header = json.loads(data[8 : 8 + size])
    assert list(header) == sorted(header)
    assert list(header["__metadata__"]) == sorted(METADATA)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        folder = rundir.make_dir(tmp_path / "run" / "rounds")
        rundir.save_tensors(folder / "a.safetensors", _tensors())
        rundir.write_text_atomic(folder / "b.txt", "x")
        rundir.append_jsonl(folder / "c.jsonl", {"round": 1})
    finally:
        os.umask(old)
    for name in ("a.safetensors", "b.txt", "c.jsonl"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_atomic_write_leaves_no_temporary_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    rundir.write_text_atomic(path, "old")
    rundir.write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_jsonl_lines_of_two_writers_are_all_kept(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    for i in range(50):
        rundir.append_jsonl(path, {"writer": i % 2, "i": i})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["i"] for line in lines] == list(range(50))


def test_replace_dir_swaps_a_complete_directory(tmp_path: Path) -> None:
    final, new = tmp_path / "round_0002", tmp_path / ".round_0002.tmp"
    final.mkdir()
    (final / "f").write_text("old")
    new.mkdir()
    (new / "f").write_text("new")
    rundir.replace_dir(new, final)
    assert (final / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0002"]


def test_a_leftover_from_an_interrupted_swap_is_cleared(tmp_path: Path) -> None:
    aside, new, final = tmp_path / ".r.old", tmp_path / ".r.tmp", tmp_path / "r"
    aside.mkdir()  # a crash after moving the old round aside
    new.mkdir()
    rundir.replace_dir(new, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


@pytest.mark.parametrize(
    "name", ["..", ".", ".hidden", "a/b", "../x", "a\\b", "", "tab\there", "x" * 300]
)
def test_names_must_be_one_plain_component(tmp_path: Path, name: str) -> None:
    problem = rundir.location_problem(tmp_path, name)
    assert problem is not None and problem.startswith("run.name:")


def test_a_plain_name_is_accepted(tmp_path: Path) -> None:
    assert rundir.location_problem(tmp_path, "quickstart-r8_v2.1") is None


def test_a_run_name_that_links_elsewhere_is_refused(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "elsewhere")
    problem = rundir.location_problem(tmp_path / "runs", "link")
    assert problem and "outside run.output_dir" in problem


def test_a_run_directory_may_not_contain_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    problem = rundir.location_problem("../..", "project")
    assert problem and "contains the current directory" in problem
    assert rundir.location_problem("..", "sub") is not None
    assert rundir.location_problem(".", "runs") is None


def test_only_fedsims_own_marker_counts(tmp_path: Path) -> None:
    assert not rundir.is_fedsim_dir(tmp_path)
    (tmp_path / rundir.RUN_MARKER).write_text("anything a user might write")
    assert not rundir.is_fedsim_dir(tmp_path)
    rundir.mark_run_dir(tmp_path)
    assert rundir.is_fedsim_dir(tmp_path)
