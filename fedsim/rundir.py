"""Run-directory I/O: the one place that writes files fedsim keeps.

Every writer here has the same guarantees, so callers need not think about them:

- **atomic**: a file is written under a hidden temporary name, flushed to disk (`fsync`), renamed
  over its target, and the directory is fsynced, so a reader or a crash sees the old or the new
  content, never a mix, and a rename survives power loss;
- **the user's umask**: files are created with mode 0666 and directories 0777 less the umask (as
  any Unix tool does), so an evaluation job running as another user on a shared cluster can read
  what training wrote when the umask allows it; nothing is created owner-only behind its back;
- **byte-deterministic**: tensors are serialised by `tensor_bytes`, whose safetensors header has
  sorted keys (the safetensors library writes `__metadata__` in hash order, which differs between
  processes), and JSON with sorted keys, so the same content gives the same sha256.

A directory that fedsim made is recognised by its marker file `.fedsim-run` (`mark_run_dir`), not
by a file name a user might also have: `--overwrite` deletes only directories that carry it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.config import run_name_problem
from fedsim.errors import FedsimInputError

RUN_MARKER = ".fedsim-run"
"""File whose presence (with the content `MARKER_TEXT`) says that fedsim created the directory."""
MARKER_TEXT = '{"created_by": "fedsim", "format": 1}\n'

if TYPE_CHECKING:  # only the processes that write tensors import torch (not the driver)
    import torch

_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
"""torch dtype name -> safetensors dtype."""


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (renames, creations) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data`: readers see the old or the new content, never a mix."""
    write_chunks_atomic(path, [data])


def write_chunks_atomic(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Replace `path` with `chunks` one after another, written as they come (a large file need
    not be held whole), atomically as `write_bytes_atomic`."""
    path = Path(path)
    tmp = _temporary(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # 0666 less the umask
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """Canonical JSON for files: sorted keys, indented, one trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json_text(obj))


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single write(2) on an O_APPEND descriptor, then fsync.

    The kernel places each such write whole at the end of the file, so lines of concurrent
    writers (the trainer, an evaluation job) never interleave and none overwrites another.
    """
    path = Path(path)
    data = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if written != len(data):
        raise OSError(f"short write to {path}")


def tensor_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file's bytes, the same for the same tensors and metadata in any process.

    The layout is the safetensors format (8-byte little-endian header length, a JSON header,
    the tensors' data back to back) with the header's keys, the metadata's included, sorted and
    the data in name order; `safetensors.torch.load_file` and PEFT read it like any other.
    """
    import torch

    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name}: dtype {tensor.dtype} cannot be saved")
        raw = tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically and byte-deterministically (see `tensor_bytes`)."""
    write_bytes_atomic(path, tensor_bytes(tensors, {"format": "pt", **(metadata or {})}))


def make_dir(path: str | Path) -> Path:
    """mkdir -p with the umask's mode, fsyncing the parent so the new entry is durable."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        fsync_dir(path.parent)
    return path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory `tmp` to `final`, replacing an older `final` safely.

    The old directory is first renamed aside (to a hidden name that readers skip), the new one
    renamed into place, and only then is the old one deleted: at no moment is the old content
    gone while the new one is not yet complete in its place. Directory entries are fsynced after
    every rename.
    """
    aside = final.with_name(f".{final.name}.old")
    if aside.exists():
        shutil.rmtree(aside)
    if final.exists():
        os.rename(final, aside)
        fsync_dir(final.parent)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def mark_run_dir(run_dir: Path) -> None:
    """Record that fedsim created `run_dir` (see `is_fedsim_dir`)."""
    write_text_atomic(run_dir / RUN_MARKER, MARKER_TEXT)


def is_fedsim_dir(run_dir: Path) -> bool:
    """True when `run_dir` carries fedsim's marker, so fedsim may delete it on --overwrite."""
    marker = run_dir / RUN_MARKER
    try:
        return marker.is_file() and not marker.is_symlink() and marker.read_text() == MARKER_TEXT
    except (OSError, UnicodeDecodeError):
        return False


# ------------------------------------------------------------------------------------------
# Where a run directory may be
# ------------------------------------------------------------------------------------------


def location_problem(output_dir: str | Path, name: str) -> str | None:
    """Why `<output_dir>/<name>` may not be used as a run directory, or None.

    Besides the name itself: the run directory must resolve (symbolic links followed) to a direct
    child of the resolved output directory, and must not contain the current directory, since
    `--overwrite` may delete it.
    """
    problem = run_name_problem(name)
    if problem:
        return f"run.name: {problem}"
    out = Path(output_dir).expanduser().resolve()
    run = (out / name).resolve()
    if run.parent != out:
        return (
            f"run.name: {Path(output_dir) / name} resolves to {run}, outside run.output_dir "
            f"({out}); a run directory must be a folder directly inside it, not a link elsewhere"
        )
    cwd = Path.cwd().resolve()
    if run == cwd or run in cwd.parents:
        return (
            f"run.name: the run directory {run} contains the current directory; choose "
            "run.output_dir and run.name so that the run lives below where you work"
        )
    return None


# ------------------------------------------------------------------------------------------
# Creating, replacing and recording a run directory
# ------------------------------------------------------------------------------------------

CONFIGS_DIR = "configs"
"""Every config a run has used, as `round_NNNN.yaml` (the first round it applied to)."""


def config_name(round_idx: int) -> str:
    """File name, in the run's `configs/` folder, of the config that took effect at a round."""
    return f"round_{round_idx:04d}.yaml"


def check_overwritable(run_dir: Path) -> None:
    """--overwrite deletes only an empty folder or one that fedsim made (its marker file)."""
    if not run_dir.is_dir() or run_dir.is_symlink():
        raise FedsimInputError(f"--overwrite: {run_dir} is not a directory; refusing to replace it")
    if any(run_dir.iterdir()) and not is_fedsim_dir(run_dir):
        raise FedsimInputError(
            f"--overwrite: {run_dir} was not created by fedsim (it has no {RUN_MARKER} "
            "marker); refusing to delete it: remove it yourself or choose another run.name"
        )


def move_aside(run_dir: Path) -> Path:
    """Rename the run directory that --overwrite replaces to a hidden sibling (deleted once the
    new one exists), so that a crash in between leaves it whole rather than half deleted."""
    aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
    os.rename(run_dir, aside)
    fsync_dir(run_dir.parent)
    return aside


def record_config(run_dir: Path, text: str, first_round: int) -> None:
    """Write config.yaml, keeping every config the run has used in `configs/round_NNNN.yaml`,
    named by the first round it applied to. Configs of rounds about to be redone are dropped."""
    history = make_dir(run_dir / CONFIGS_DIR)
    current = run_dir / "config.yaml"
    if current.is_file() and not any(history.iterdir()):  # a run from before the history
        write_bytes_atomic(history / config_name(1), current.read_bytes())
    kept = []
    for path in sorted(history.glob("round_*.yaml")):
        if int(path.stem[6:]) >= first_round:
            path.unlink()
        else:
            kept.append(path)
    if not kept or kept[-1].read_text() != text:
        write_text_atomic(history / config_name(first_round), text)
    write_text_atomic(current, text)
