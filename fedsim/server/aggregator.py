"""The Aggregator: folds client updates in as they arrive and writes each round's checkpoint.

It runs as a Ray actor (`AggregatorActor`) beside the workers; `Aggregator` itself is a plain
class so the round logic is testable without Ray. Updates reach it straight from the workers
through the object store (the driver only passes references), and it holds O(1) adapters: the
global one, and one int64 accumulator per tensor.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import ray
import torch

from fedsim import checkpoint
from fedsim.errors import UpdateRejected
from fedsim.server.aggregation import WeightedDeltaSum
from fedsim.server.strategies import make_strategy

TensorDict = dict[str, torch.Tensor]


def adapter_nbytes(adapter: TensorDict) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.values())


class Aggregator:
    """Round-by-round weighted aggregation and checkpointing for one run directory."""

    def __init__(
        self,
        run_dir: str,
        strategy: str,
        weighting: str,
        adapter_config: dict[str, Any],
        provenance: dict[str, str],
    ) -> None:
        self.run_dir = Path(run_dir)
        self.strategy = make_strategy(strategy)
        self.weighting = weighting
        self.adapter_config = adapter_config
        self.provenance = provenance
        self.global_adapter: TensorDict = {}
        self._sum: WeightedDeltaSum | None = None
        self._weights: dict[int, int] = {}
        self._rejected: dict[int, str] = {}
        self._accepted: list[int] = []
        self._bytes_up = 0
        self._fold_seconds = 0.0

    def set_global(self, adapter: TensorDict, server_state: TensorDict | None = None) -> None:
        """Start from `adapter` (the initial one, or a checkpoint's) and the strategy's state."""
        self.global_adapter = {k: v.clone() for k, v in adapter.items()}
        self.strategy.load_state_dict(server_state or {})

    def begin_round(self, sample_counts: dict[int, int]) -> None:
        """Prepare for the selected clients; `sample_counts` maps client id to its record count."""
        self._weights = {
            c: (n if self.weighting == "samples" else 1) for c, n in sample_counts.items()
        }
        self._sum = WeightedDeltaSum(self.global_adapter, sum(self._weights.values()))
        self._rejected, self._accepted = {}, []
        self._bytes_up, self._fold_seconds = 0, 0.0

    def fold(self, client_id: int, adapter: TensorDict) -> str | None:
        """Add one client's adapter; returns the reason if it was rejected, else None."""
        assert self._sum is not None, "begin_round first"
        start = time.perf_counter()
        self._bytes_up += adapter_nbytes(adapter)
        try:
            self._sum.add(adapter, self._weights[client_id])
        except UpdateRejected as err:
            self._rejected[client_id] = str(err)
            return str(err)
        finally:
            self._fold_seconds += time.perf_counter() - start
        self._accepted.append(client_id)
        return None

    def finish_round(
        self, round_idx: int, info: dict[str, Any]
    ) -> tuple[dict[str, Any], TensorDict]:
        """Apply the strategy, write the round checkpoint, and return (summary, new adapter).

        With no accepted update the previous global adapter is kept, and round.json says so.
        """
        assert self._sum is not None, "begin_round first"
        if self._sum.count:
            self.global_adapter = self.strategy.apply(self.global_adapter, self._sum.mean())
        start = time.perf_counter()
        summary = {
            **info,
            "aggregation": {
                "strategy": self.strategy.name,
                "weighting": self.weighting,
                "weights": {str(c): self._weights[c] for c in sorted(self._accepted)},
                "accepted": sorted(self._accepted),
                "rejected": {str(c): why for c, why in sorted(self._rejected.items())},
                "kept_previous_adapter": self._sum.count == 0,
                "fold_seconds": round(self._fold_seconds, 6),
            },
            "aggregator": f"{socket.gethostname()}:{os.getpid()}",
            "bytes": {
                "adapter": adapter_nbytes(self.global_adapter),
                "uplink": self._bytes_up,
            },
            **self.provenance,
        }
        checkpoint.write_round(
            self.run_dir,
            round_idx,
            self.global_adapter,
            self.adapter_config,
            self.strategy.state_dict(),
            summary,
        )
        summary["checkpoint_seconds"] = round(time.perf_counter() - start, 6)
        self._sum = None
        return summary, self.global_adapter


AggregatorActor = ray.remote(num_cpus=0)(Aggregator)
