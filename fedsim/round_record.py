"""The round record: one round's figures, built once, held by round.json and metrics.jsonl alike.

The driver measures its part (`TrainedRound`: who trained, samples, losses, time, memory) right
before it asks the aggregator to finish the round; the aggregator adds what only it knows
(uplink bytes, rejections, epsilon, whether an update was applied) and builds the frozen
`RoundRecord`, which heads round.json and, once that checkpoint is on disk, is the round's line
in metrics.jsonl (with the checkpoint's own timings beside it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class Outcome(Protocol):
    """What the record reads of a client's outcome (fedsim.client.worker.ClientOutcome)."""

    client_id: int
    ok: bool
    num_samples: int
    mean_loss: float
    losses: list[float]
    peak_rss_mb: float


@dataclass(frozen=True)
class TrainedRound:
    """The driver's part of a round's record."""

    round: int
    clients: tuple[int, ...]
    num_failed: int
    samples: int
    train_loss: float
    """Sample-weighted mean of the clients' mean local losses (NaN when none trained)."""
    global_loss: float
    """Each client's first step runs at the incoming global weights: its loss scores the previous
    round's global adapter on that client's data, before any local update (sample-weighted)."""
    seconds: float
    """Wall-clock seconds from the round's selection to its last update folded in."""
    driver_peak_rss_mb: float
    worker_peak_rss_mb: float | None
    object_store_bytes: int
    simulated_seconds: float | None = None
    """The system model's simulated round time (with `system.enabled`)."""

    @classmethod
    def measure(
        cls,
        round_idx: int,
        outcomes: Sequence[Outcome],
        seconds: float,
        resources: dict[str, Any],
        simulated_seconds: float | None = None,
    ) -> TrainedRound:
        ok = [o for o in outcomes if o.ok]
        samples = sum(o.num_samples for o in ok)
        first = [(o.losses[0], o.num_samples) for o in ok if o.losses]
        return cls(
            round=round_idx,
            clients=tuple(o.client_id for o in outcomes),
            num_failed=len(outcomes) - len(ok),
            samples=samples,
            train_loss=_weighted([(o.mean_loss, o.num_samples) for o in ok]),
            global_loss=_weighted(first),
            seconds=round(seconds, 3),
            simulated_seconds=None if simulated_seconds is None else round(simulated_seconds, 6),
            **resources,
        )


@dataclass(frozen=True)
class RoundRecord(TrainedRound):
    """A round's record: the driver's part and the aggregator's."""

    uplink_bytes: int = 0
    rejected: dict[str, str] = field(default_factory=dict)
    """Client id -> why its update was not used."""
    aggregator_peak_rss_mb: float | None = None
    kept_previous_adapter: bool = False
    """No update could be applied: the round kept the previous global adapter."""
    epsilon: float | None = None
    """Client-level DP: the accountant's cumulative epsilon after this round."""

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON: optional figures that do not apply are left out."""
        out = {"num_clients": self.num_clients, **dataclasses.asdict(self)}
        out["clients"] = list(self.clients)
        for optional in ("simulated_seconds", "epsilon"):
            if out[optional] is None:
                del out[optional]
        if not out["kept_previous_adapter"]:
            del out["kept_previous_adapter"]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in names}
        return cls(**{**kept, "clients": tuple(kept["clients"])})


def _weighted(pairs: list[tuple[float, int]]) -> float:
    weight = sum(n for _, n in pairs)
    return sum(x * n for x, n in pairs) / weight if weight else math.nan
