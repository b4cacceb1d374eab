"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): noise and accounting.

The aggregator clips every client's delta to L2 norm C, sums the clipped deltas, divides by the
fixed number k of clients selected for the round (not by those that arrived: fixed weights keep
the sensitivity at C/k), and adds Gaussian noise of std sigma*C/k to every coordinate. The noise is
drawn from a generator seeded by (seed, round), so a resumed run adds the same noise.

The privacy accountant is dp-accounting's RDP accountant. k of N clients are sampled uniformly
without replacement, so the neighbouring relation is "replace one client" (N is public), under
which one client moves the clipped sum by up to 2C: each round is a `SampledWithoutReplacement`
(N, k) Gaussian event with noise multiplier sigma/2 relative to that sensitivity. Selections that
are not uniform (round_robin, availability) get no amplification by sampling: each round counts as
a full Gaussian event on every client, an upper bound.
"""

from __future__ import annotations

import logging

import torch

from fedsim.seeds import Stream, seed_of

TensorDict = dict[str, torch.Tensor]


def gaussian_noise(reference: TensorDict, std: float, seed: int, round_idx: int) -> TensorDict:
    """Float64 N(0, std^2) noise shaped like `reference`, a pure function of (seed, round)."""
    gen = torch.Generator().manual_seed(seed_of(seed, Stream.DP_NOISE, round_idx))
    return {
        k: torch.randn(v.shape, generator=gen, dtype=torch.float64) * std
        for k, v in sorted(reference.items())
    }


def dp_epsilon(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    num_clients: int,
    per_round: int | None,
) -> float:
    """Cumulative epsilon after `rounds` rounds at `delta`: `per_round` of `num_clients` sampled
    uniformly without replacement each round, or None for a selection with no amplification."""
    import dp_accounting
    from dp_accounting import dp_event, rdp

    gaussian = dp_event.GaussianDpEvent(noise_multiplier / 2)  # replace-one: sensitivity 2C
    event: dp_event.DpEvent = gaussian
    if per_round is not None and per_round < num_clients:
        event = dp_event.SampledWithoutReplacementDpEvent(num_clients, per_round, gaussian)
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    accountant.compose(event, rounds)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # it warns about each fractional order it cannot evaluate
    try:
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)
