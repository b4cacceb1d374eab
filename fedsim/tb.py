"""TensorBoard event files, when the optional `tensorboard` extra is installed.

`pip install fedsim[tensorboard]` and every round's training metrics (the driver) and every
evaluation result (`fedsim eval`) also stream to `RUN_DIR/tensorboard/{train,eval}`, so
`tensorboard --logdir runs/` shows them. Without the extra, `ScalarLog` does nothing. This is the
writer; `fedsim.tracking.TensorBoardTracker` feeds it, beside the MLflow and W&B trackers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"


def tensorboard_available() -> bool:
    """Whether torch's SummaryWriter can work: the tensorboard package is installed. (Asked
    without importing either: the driver imports torch only if it writes a scalar.)"""
    return importlib.util.find_spec("tensorboard") is not None


class ScalarLog:
    """Scalars by tag and step into one TensorBoard log directory; a no-op without tensorboard.

    The directory (and its event file) is created on the first scalar, not before."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._writer: Any = None
        self.enabled = tensorboard_available()

    def add(self, tag: str, value: float | int | None, step: int) -> None:
        """One scalar; None and bools are skipped."""
        if not self.enabled or value is None or isinstance(value, bool):
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
        self._writer.add_scalar(tag, float(value), step)

    def add_all(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """Every number in `values` as `prefix/key`."""
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.add(f"{prefix}/{key}", value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
