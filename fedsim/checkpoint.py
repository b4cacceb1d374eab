"""Round checkpoints: atomic writes, integrity checks, and finding where to resume.

A round directory is written under a hidden temporary name and renamed into place only when
complete, so a reader never sees half a checkpoint. `round.json` records the sha256 of every other
file; resume verifies them and falls back to the newest intact round. `latest` names the newest
complete round and is replaced atomically. Nothing here unpickles: tensors are safetensors,
metadata JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim import rundir

if TYPE_CHECKING:  # tensors are read only where they are used: the driver never imports torch
    import torch

TensorDict = dict[str, "torch.Tensor"]

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
SERVER_STATE_FILE = "server_state.safetensors"
ROUND_INFO_FILE = "round.json"
LATEST_FILE = "latest"
METRICS_FILE = "metrics.jsonl"
ROUNDS_DIR = "rounds"


class CheckpointWriteError(OSError):
    """A round checkpoint could not be written; the previous round and `latest` are intact."""


def round_name(round_idx: int) -> str:
    return f"round_{round_idx:04d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


write_text_atomic = rundir.write_text_atomic  # kept for callers outside the run loop


@dataclass
class RoundCheckpoint:
    """A verified round on disk: its number and round.json; its tensors are read on first use
    (the driver that finds a resume point never reads them: the aggregator does)."""

    round_idx: int
    path: Path
    info: dict[str, Any]

    @functools.cached_property
    def adapter(self) -> TensorDict:
        from safetensors.torch import load_file

        return load_file(str(self.path / ADAPTER_FILE))

    @functools.cached_property
    def server_state(self) -> TensorDict:
        from safetensors.torch import load_file

        state_path = self.path / SERVER_STATE_FILE
        return load_file(str(state_path)) if state_path.exists() else {}


def write_round(
    run_dir: Path,
    round_idx: int,
    adapter: TensorDict,
    adapter_config: dict[str, Any],
    server_state: TensorDict,
    info: dict[str, Any],
) -> Path:
    """Write `rounds/round_NNNN/` atomically, then point `latest` at it.

    `info` becomes round.json, with the sha256 of each file added under `files`. On a failed
    write (disk full, permission denied) the partial temporary directory is removed and
    CheckpointWriteError names the path; the previous round and `latest` are untouched.
    """
    tmp = run_dir / ROUNDS_DIR / f".{round_name(round_idx)}.tmp"
    try:
        _write_round_files(tmp, adapter, adapter_config, server_state, info, round_idx)
        # A redone round (resume fell back past it) replaces the old one without a moment in
        # which neither is complete on disk.
        final = tmp.with_name(round_name(round_idx))
        rundir.replace_dir(tmp, final)
        point_latest(run_dir, round_idx)
        return final
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        where = err.filename or tmp
        raise CheckpointWriteError(
            f"cannot write the checkpoint of round {round_idx}: {where}: {err.strerror or err}"
        ) from err


def _write_round_files(
    tmp: Path,
    adapter: TensorDict,
    adapter_config: dict[str, Any],
    server_state: TensorDict,
    info: dict[str, Any],
    round_idx: int,
) -> None:
    rundir.make_dir(tmp.parent)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    rundir.save_tensors(tmp / ADAPTER_FILE, adapter)
    rundir.write_json_atomic(tmp / ADAPTER_CONFIG_FILE, adapter_config)
    if server_state:
        rundir.save_tensors(tmp / SERVER_STATE_FILE, server_state)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    rundir.write_json_atomic(tmp / ROUND_INFO_FILE, {**info, "round": round_idx, "files": files})


def point_latest(run_dir: Path, round_idx: int) -> None:
    """Make `latest` name `round_idx` (atomically)."""
    rundir.write_text_atomic(run_dir / LATEST_FILE, round_name(round_idx) + "\n")


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to metrics.jsonl (one O_APPEND write, fsynced)."""
    rundir.append_jsonl(run_dir / METRICS_FILE, record)


def truncate_metrics(run_dir: Path, last_round: int) -> None:
    """Drop metrics lines of rounds after `last_round` (they are about to be redone)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("round", 0) <= last_round
    ]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def verify_round(path: Path) -> str | None:
    """Return None if the round directory is intact, else what is wrong with it."""
    info_path = path / ROUND_INFO_FILE
    try:
        info = json.loads(info_path.read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{info_path} is missing or unreadable"
    if ADAPTER_FILE not in files:
        return f"{info_path} lists no {ADAPTER_FILE}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if sha256_file(file) != expected:
            return f"{file} does not match its sha256 in round.json"
    return None


def list_rounds(run_dir: Path) -> list[int]:
    """Round numbers that have a (renamed, so once complete) directory, ascending."""
    rounds = run_dir / ROUNDS_DIR
    if not rounds.is_dir():
        return []
    found = []
    for p in rounds.iterdir():
        if p.is_dir() and p.name.startswith("round_") and p.name[6:].isdigit():
            found.append(int(p.name[6:]))
    return sorted(found)


def load_round(path: Path) -> RoundCheckpoint:
    """Read a round directory (call `verify_round` first)."""
    info = json.loads((path / ROUND_INFO_FILE).read_text())
    return RoundCheckpoint(round_idx=int(info["round"]), path=path, info=info)


def find_resume_point(run_dir: Path, log: Callable[[str], None] = print) -> RoundCheckpoint | None:
    """The newest intact round, verified by sha256; damaged newer rounds are reported via `log`."""
    for round_idx in reversed(list_rounds(run_dir)):
        path = run_dir / ROUNDS_DIR / round_name(round_idx)
        problem = verify_round(path)
        if problem is None:
            return load_round(path)
        log(f"resume: skipping {path.name}: {problem}")
    return None
