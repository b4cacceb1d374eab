"""Seed-derived client selection: a pure function of (seed, round), so a resumed run selects
exactly the clients the uninterrupted run would have.

`uniform` samples without replacement; `round_robin` walks the client ids in order, `per_round` at a
time; `all` takes every client; `availability` first draws which clients are available this round
(client i with its own probability p_i) and samples uniformly among them, fewer when fewer are
available.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fedsim.seeds import Stream, generator, seed_of


def select_clients(seed: int, round_idx: int, num_clients: int, per_round: int) -> list[int]:
    """Sample `per_round` distinct client ids uniformly, returned in ascending order."""
    if not 0 < per_round <= num_clients:
        raise ValueError(f"cannot sample {per_round} of {num_clients} clients")
    rng = generator(seed, Stream.SELECTION, round_idx)
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def round_robin(round_idx: int, num_clients: int, per_round: int) -> list[int]:
    """Round r takes the next `per_round` ids after round r-1's, wrapping around."""
    start = ((round_idx - 1) * per_round) % num_clients
    return sorted((start + j) % num_clients for j in range(per_round))


def available_clients(seed: int, round_idx: int, probabilities: list[float]) -> list[int]:
    """The clients available in this round: client i with probability `probabilities[i]`."""
    draws = generator(seed, Stream.AVAILABILITY, round_idx).random(len(probabilities))
    return [i for i, p in enumerate(probabilities) if draws[i] < p]


def draw_probabilities(
    distribution: str,
    num_clients: int,
    seed: int,
    value: float = 1.0,
    low: float = 0.0,
    high: float = 1.0,
    a: float = 2.0,
    b: float = 2.0,
) -> list[float]:
    """Per-client availability probabilities from a distribution, drawn once per run."""
    rng = generator(seed, Stream.AVAILABILITY_PROBABILITIES)
    if distribution == "constant":
        return [value] * num_clients
    if distribution == "uniform":
        return [float(x) for x in rng.uniform(low, high, num_clients)]
    if distribution == "beta":
        return [float(x) for x in rng.beta(a, b, num_clients)]
    raise ValueError(f"unknown availability distribution {distribution!r}")


@dataclass(frozen=True)
class Selection:
    """A round's selected clients and how they were chosen (recorded in round.json)."""

    clients: list[int]
    kind: str
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.details}


def select_round(
    kind: str,
    seed: int,
    round_idx: int,
    num_clients: int,
    per_round: int,
    probabilities: list[float] | None = None,
) -> Selection:
    """The clients of one round under `server.selection`."""
    if kind == "uniform":
        clients = select_clients(seed, round_idx, num_clients, per_round)
        return Selection(clients, kind, {"requested": per_round})
    if kind == "round_robin":
        return Selection(
            round_robin(round_idx, num_clients, per_round), kind, {"requested": per_round}
        )
    if kind == "all":
        return Selection(list(range(num_clients)), kind)
    if kind == "availability":
        assert probabilities is not None and len(probabilities) == num_clients
        available = available_clients(seed, round_idx, probabilities)
        take = min(per_round, len(available))
        rng = generator(seed, Stream.SELECTION, round_idx)
        chosen = sorted(int(available[i]) for i in rng.choice(len(available), take, replace=False))
        return Selection(chosen, kind, {"requested": per_round, "available": len(available)})
    raise ValueError(f"unknown selection {kind!r}")


def over_selection(
    seed: int, round_idx: int, num_clients: int, selected: list[int]
) -> Iterator[int]:
    """Clients not in `selected`, in a seeded random order, drawn lazily: a round that needs two
    extra clients costs two draws (plus rare repeats), not a pass over every registered client."""
    rng = generator(seed, Stream.OVER_SELECTION, round_idx)
    seen = set(selected)
    while len(seen) < num_clients:
        c = int(rng.integers(num_clients))
        if c not in seen:
            seen.add(c)
            yield c


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    """The seed of one client's local training in one round (batch order, dropout)."""
    return seed_of(seed, Stream.TRAINING, round_idx, client_id)
