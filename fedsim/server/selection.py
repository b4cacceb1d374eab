"""Seed-derived client selection: a pure function of (seed, round), so a resumed run selects
exactly the clients the uninterrupted run would have."""

from __future__ import annotations

import numpy as np

SELECTION_STREAM = 1
"""Distinguishes the selection's random stream from the training streams of the same round."""


def round_rng(seed: int, round_idx: int, stream: int) -> np.random.Generator:
    """An independent generator for one (seed, round, purpose)."""
    return np.random.default_rng(np.random.SeedSequence([seed, round_idx, stream]))


def select_clients(seed: int, round_idx: int, num_clients: int, per_round: int) -> list[int]:
    """Sample `per_round` distinct client ids uniformly, returned in ascending order."""
    if not 0 < per_round <= num_clients:
        raise ValueError(f"cannot sample {per_round} of {num_clients} clients")
    rng = round_rng(seed, round_idx, SELECTION_STREAM)
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    """The seed of one client's local training in one round (batch order, dropout)."""
    return int(np.random.SeedSequence([seed, round_idx, client_id, 2]).generate_state(1)[0])
