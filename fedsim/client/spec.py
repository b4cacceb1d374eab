"""What the driver tells a worker: the local-training settings and how to build the model.

These travel from the driver to every ClientWorker, so this module imports neither torch nor
the trainers: the driver process never loads them (fedsim/actors.py says why).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import ClientConfig, CompressionConfig, LoraConfig


@dataclass(frozen=True)
class TrainSettings:
    """What local training reads: the config's `client` section as it is, and the tokenizer's
    pad id (which the config does not know)."""

    client: ClientConfig
    pad_token_id: int = 0

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step."""
        return self.client.batch_size // self.client.micro_batch_size

    def num_steps(self, num_examples: int) -> int:
        """Optimizer steps for a shard of `num_examples` records."""
        c = self.client
        if c.local_steps is not None:
            return c.local_steps
        assert c.local_epochs is not None
        return max(1, math.ceil(c.local_epochs * num_examples / c.batch_size))

    def with_client(self, **changes: Any) -> TrainSettings:
        """These settings with some `client.*` fields changed."""
        return dataclasses.replace(self, client=dataclasses.replace(self.client, **changes))


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its model and trainer once.

    The shards, and the model when it is the built-in tiny one, can come through Ray's object
    store (`shards_ref`, `model_files_ref`) instead of paths, so that workers on nodes that do
    not share the driver's filesystem get them too.
    """

    model_path: str
    model_name: str
    dtype: str
    lora: LoraConfig
    seed: int
    shards_dir: str
    backend: str
    settings: TrainSettings
    num_threads: int = 1
    device: str = "cpu"
    """cpu, or cuda for workers given GPUs (Ray sets CUDA_VISIBLE_DEVICES per worker)."""
    quantization: str | None = None
    shards_ref: Any = None
    """ObjectRef of the shard index (`index.json`'s text); when set, `shards_dir` is not read
    and each task brings its client's block (`ClientTask.shard_ref`)."""
    model_files_ref: Any = None
    """ObjectRef of `pack_directory(model_path)`; when set, `model_path` is not read."""
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Uplink compression of the client's delta (`client.compression`)."""


def pack_directory(path: str | Path) -> dict[str, np.ndarray]:
    """Every file under `path` as {relative path: bytes as uint8}, for `ray.put` (numpy arrays
    come back from the object store without a copy)."""
    root = Path(path)
    return {
        f.relative_to(root).as_posix(): np.frombuffer(f.read_bytes(), dtype=np.uint8)
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }
