"""Simulated system heterogeneity: per-client compute speed, bandwidth and dropout, and a round
deadline that drops stragglers.

Nothing here is measured: each sampled client's round takes a *simulated* time,
`local_steps * step_seconds / speed + 2 * adapter_bytes / bandwidth` (download and upload of the
adapter), and a client whose time passes `deadline_seconds` is a straggler, dropped before it
trains (its update would arrive too late, so the simulation does not spend compute on it). A
client also drops out with its profile's probability. Everything is a function of (seed, round,
client), so the same seed drops the same clients, on any machine and on resume.

Profiles cost nothing per registered client: a client's device is drawn from the seed when it is
sampled, so 10,000 registered clients need no table; the run's `client.profile` file (see
fedsim.data.profiles) overrides speed, bandwidth and dropout for the clients and classes it
describes. The driver calls `SystemModel.plan_round` once per round and
trains only `RoundPlan.kept`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsim.config import SystemConfig
from fedsim.data.profiles import ClientProfile
from fedsim.seeds import Stream, generator


@dataclass(frozen=True)
class DeviceProfile:
    """How one client's device behaves: relative compute speed (1 = reference), link bandwidth
    in megabits per second, and the probability it drops out of a round it was sampled for."""

    speed: float
    bandwidth_mbps: float
    dropout: float


@dataclass
class RoundPlan:
    """Which sampled clients train this round, and the simulated wall-clock of the round."""

    kept: list[int]
    dropped_out: list[int]
    stragglers: list[int]
    client_seconds: dict[int, float]
    simulated_seconds: float
    over_selected: list[int] = field(default_factory=list)
    """Clients invited beyond the selection to reach `server.min_updates`, in invitation order."""

    def to_json(self) -> dict[str, Any]:
        """The `system` entry of round.json."""
        return {
            "kept": self.kept,
            "dropped_out": self.dropped_out,
            "stragglers": self.stragglers,
            "client_seconds": {str(c): round(s, 6) for c, s in self.client_seconds.items()},
            "simulated_seconds": round(self.simulated_seconds, 6),
            "over_selected": self.over_selected,
        }


class SystemModel:
    """Per-client profiles and the round plan they imply, all derived from the run's seed."""

    def __init__(
        self,
        settings: SystemConfig,
        seed: int,
        profiles: Sequence[ClientProfile] | None = None,
    ) -> None:
        self.settings = settings
        self.seed = seed
        self.profiles = profiles

    def profile(self, client_id: int) -> DeviceProfile:
        """The client's device: drawn (log-normal speed and bandwidth around the configured
        medians) from its own random stream, with the fields its `client.profile` entry sets."""
        s = self.settings
        rng = generator(self.seed, Stream.CLIENT_PROFILE, client_id)
        speed, bandwidth = rng.standard_normal(2)
        drawn = DeviceProfile(
            speed=math.exp(s.speed_sigma * speed),
            bandwidth_mbps=s.bandwidth_mbps * math.exp(s.bandwidth_sigma * bandwidth),
            dropout=s.dropout,
        )
        if self.profiles is None:
            return drawn
        own = self.profiles[client_id]
        return DeviceProfile(
            speed=drawn.speed if own.speed is None else own.speed,
            bandwidth_mbps=drawn.bandwidth_mbps
            if own.bandwidth_mbps is None
            else own.bandwidth_mbps,
            dropout=drawn.dropout if own.dropout is None else own.dropout,
        )

    def client_seconds(self, client_id: int, local_steps: int, adapter_bytes: int) -> float:
        """Simulated seconds of one client's round: compute, then adapter down and up."""
        p = self.profile(client_id)
        transfer = 2 * adapter_bytes * 8 / (p.bandwidth_mbps * 1e6)
        return local_steps * self.settings.step_seconds / p.speed + transfer

    def plan_round(
        self,
        round_idx: int,
        selected: list[int],
        local_steps: Callable[[int], int],
        adapter_bytes: int,
        extras: Iterable[int] = (),
        min_kept: int = 0,
    ) -> RoundPlan:
        """Drop the clients that drop out or would miss the deadline; the round's simulated time
        is the slowest kept client's, or the deadline when someone was waited for in vain.
        `local_steps(c)` is client c's local steps this round. Over-selection: while fewer than
        `min_kept` clients are kept, the next client of `extras` is invited too."""
        kept, dropped, late, invited = [], [], [], []
        seconds: dict[int, float] = {}
        deadline = self.settings.deadline_seconds

        def invite(c: int) -> None:
            seconds[c] = self.client_seconds(c, local_steps(c), adapter_bytes)
            if self.drops_out(round_idx, c):
                dropped.append(c)
            elif deadline is not None and seconds[c] > deadline:
                late.append(c)
            else:
                kept.append(c)

        for c in selected:
            invite(c)
        for c in extras:
            if len(kept) >= min_kept:
                break
            invited.append(c)
            invite(c)
        slowest = max((seconds[c] for c in kept), default=0.0)
        waited = deadline if (late or dropped) and deadline is not None else slowest
        return RoundPlan(
            sorted(kept), sorted(dropped), sorted(late), seconds, max(slowest, waited), invited
        )

    def drops_out(self, round_idx: int, client_id: int) -> bool:
        """Whether the client drops out of this round: its own draw, whoever else was sampled."""
        draw = generator(self.seed, Stream.DROPOUT, round_idx, client_id).random()
        return bool(draw < self.profile(client_id).dropout)
