"""Per-client state of stateful strategies (SCAFFOLD's control variates) on disk.

Each client that has trained has `clients/<id>.safetensors`; clients that never trained have no
file and cost nothing. The aggregator is the only reader and writer (workers get their state
through it, via the object store), so the files only need the aggregator's file system.

A client's new state must become visible exactly when its round's checkpoint does, or a resumed
run would train from a state the uninterrupted run never had. So a round's new states are first
staged as `clients/.<id>.round_NNNN.safetensors`, and moved into place right after the round
directory is renamed into place (`commit`). At resume, `settle` finishes a commit cut short by a
crash (the round is on disk, its states staged) and discards states staged by a round that never
completed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from fedsim import rundir
from fedsim.errors import FedsimInputError

if TYPE_CHECKING:  # the driver checks and settles the store on resume without torch
    import torch

TensorDict = dict[str, "torch.Tensor"]
CLIENTS_DIR = "clients"
_STAGED = re.compile(r"^\.(\d+)\.round_(\d+)\.safetensors$")


class ClientStateStore:
    """`<run_dir>/clients/<id>.safetensors`, written through a per-round staging step."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / CLIENTS_DIR

    def path(self, client_id: int) -> Path:
        return self.dir / f"{client_id}.safetensors"

    def load(self, client_id: int) -> TensorDict | None:
        """The client's committed state, or None if it has never trained."""
        path = self.path(client_id)
        from safetensors.torch import load_file

        return load_file(str(path)) if path.exists() else None

    def stage(self, client_id: int, round_idx: int, state: TensorDict) -> None:
        """Write the client's new state for `round_idx`, not yet visible to `load`."""
        rundir.make_dir(self.dir)
        final = self.dir / f".{client_id}.round_{round_idx:04d}.safetensors"
        rundir.save_tensors(final, state, {"round": str(round_idx)})

    def _staged(self) -> list[tuple[Path, int, int]]:
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _STAGED.match(p.name)
            if m:
                found.append((p, int(m.group(1)), int(m.group(2))))
        return found

    def commit(self, round_idx: int) -> int:
        """Make the states staged for `round_idx` the clients' current ones; returns how many."""
        count = 0
        for path, client_id, staged_round in self._staged():
            if staged_round == round_idx:
                os.replace(path, self.path(client_id))
                count += 1
        if count:
            rundir.fsync_dir(self.dir)
        return count

    def check_resumable(self, resume_round: int) -> None:
        """Raise FedsimInputError if a committed state was written after `resume_round` (a
        fall-back past a damaged round cannot undo it). Reads only."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.safetensors")):
            with safe_open(str(path), "numpy") as f:  # the metadata only
                written = int((f.metadata() or {}).get("round", "0"))
            if written > resume_round:
                raise FedsimInputError(
                    f"--resume: {path} was written by round {written}, after the resume point "
                    f"(round {resume_round}); client state cannot be rolled back past a damaged "
                    "round: restore that round or start again with --overwrite"
                )

    def settle(self, resume_round: int) -> None:
        """Before resuming after `resume_round`: finish its commit if a crash cut it short, and
        drop states staged by rounds that never completed."""
        for path, _, staged_round in self._staged():
            if staged_round > resume_round:
                path.unlink()
        self.commit(resume_round)
        for tmp in self.dir.glob(".*.tmp") if self.dir.is_dir() else []:
            tmp.unlink()
