"""Simulated system heterogeneity: per-client compute speed, bandwidth and dropout, and a round
deadline that drops stragglers.

Nothing here is measured: each sampled client's round takes a *simulated* time,
`local_steps * step_seconds / speed + 2 * adapter_bytes / bandwidth` (download and upload of the
adapter), and a client whose time passes `deadline_seconds` is a straggler, dropped before it
trains (its update would arrive too late, so the simulation does not spend compute on it). A
client also drops out with its profile's probability. Everything is a function of (seed, round,
client), so the same seed drops the same clients, on any machine and on resume.

Profiles cost nothing per registered client: a client's profile is drawn from the seed when it is
sampled (or read from the `system.profiles` file, which may list only some clients), so 10,000
registered clients need no table. The driver calls `SystemModel.plan_round` once per round and
trains only `RoundPlan.kept`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.errors import FedsimInputError
from fedsim.server.selection import round_rng

PROFILE_STREAM = 5
"""Random stream of the per-client profiles (distinct from selection and partition streams)."""
DROPOUT_STREAM = 6
"""Random stream of each round's dropout draws."""
PROFILE_KEYS = ("speed", "bandwidth_mbps", "dropout")


@dataclass(frozen=True)
class ClientProfile:
    """How one client's device behaves: relative compute speed (1 = reference), link bandwidth
    in megabits per second, and the probability it drops out of a round it was sampled for."""

    speed: float
    bandwidth_mbps: float
    dropout: float


@dataclass(frozen=True)
class SystemSettings:
    """The `system` config section, as the model needs it (see fedsim.config.SystemConfig)."""

    step_seconds: float = 1.0
    speed_sigma: float = 0.0
    bandwidth_mbps: float = 100.0
    bandwidth_sigma: float = 0.0
    dropout: float = 0.0
    deadline_seconds: float | None = None
    profiles: str | None = None


@dataclass
class RoundPlan:
    """Which sampled clients train this round, and the simulated wall-clock of the round."""

    kept: list[int]
    dropped_out: list[int]
    stragglers: list[int]
    client_seconds: dict[int, float]
    simulated_seconds: float

    def to_json(self) -> dict[str, Any]:
        """The `system` entry of round.json."""
        return {
            "kept": self.kept,
            "dropped_out": self.dropped_out,
            "stragglers": self.stragglers,
            "client_seconds": {str(c): round(s, 6) for c, s in self.client_seconds.items()},
            "simulated_seconds": round(self.simulated_seconds, 6),
        }


class SystemModel:
    """Per-client profiles and the round plan they imply, all derived from the run's seed."""

    def __init__(self, settings: SystemSettings, seed: int, num_clients: int) -> None:
        self.settings = settings
        self.seed = seed
        self.num_clients = num_clients
        self._fixed = load_profiles(settings.profiles, num_clients) if settings.profiles else {}

    def profile(self, client_id: int) -> ClientProfile:
        """The client's profile: from the profiles file when it lists the client, else drawn
        (log-normal speed and bandwidth around the configured medians) from its own stream."""
        if client_id in self._fixed:
            return self._fixed[client_id]
        s = self.settings
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, client_id, PROFILE_STREAM]))
        speed, bandwidth = rng.standard_normal(2)
        return ClientProfile(
            speed=math.exp(s.speed_sigma * speed),
            bandwidth_mbps=s.bandwidth_mbps * math.exp(s.bandwidth_sigma * bandwidth),
            dropout=s.dropout,
        )

    def client_seconds(self, client_id: int, local_steps: int, adapter_bytes: int) -> float:
        """Simulated seconds of one client's round: compute, then adapter down and up."""
        p = self.profile(client_id)
        transfer = 2 * adapter_bytes * 8 / (p.bandwidth_mbps * 1e6)
        return local_steps * self.settings.step_seconds / p.speed + transfer

    def plan_round(
        self, round_idx: int, selected: list[int], steps: dict[int, int], adapter_bytes: int
    ) -> RoundPlan:
        """Drop the clients that drop out or would miss the deadline; the round's simulated time
        is the slowest kept client's, or the deadline when someone was waited for in vain.
        `steps` maps each selected client to its local steps this round."""
        rng = round_rng(self.seed, round_idx, DROPOUT_STREAM)
        draws = rng.random(len(selected))  # one draw per sampled client, in ascending id order
        seconds = {c: self.client_seconds(c, steps[c], adapter_bytes) for c in selected}
        deadline = self.settings.deadline_seconds
        kept, dropped, late = [], [], []
        for c, u in zip(selected, draws, strict=True):
            if u < self.profile(c).dropout:
                dropped.append(c)
            elif deadline is not None and seconds[c] > deadline:
                late.append(c)
            else:
                kept.append(c)
        slowest = max((seconds[c] for c in kept), default=0.0)
        waited = deadline if (late or dropped) and deadline is not None else slowest
        return RoundPlan(kept, dropped, late, seconds, max(slowest, waited))


def load_profiles(path: str, num_clients: int) -> dict[int, ClientProfile]:
    """`{"clients": {"ID": {"speed": .., "bandwidth_mbps": .., "dropout": ..}, ...}}` (JSON);
    every key is required per listed client. Bad input names the file and the client."""
    file = Path(path).expanduser()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedsimInputError(f"system.profiles: file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise FedsimInputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("clients"), dict):
        raise FedsimInputError(f'{path}: expected an object with a "clients" object')
    profiles = {}
    for key, values in data["clients"].items():
        if not key.isdigit() or not int(key) < num_clients:
            raise FedsimInputError(f"{path}: client {key!r} is not an id in 0..{num_clients - 1}")
        if not isinstance(values, dict) or set(values) != set(PROFILE_KEYS):
            raise FedsimInputError(f"{path}: client {key} needs exactly {', '.join(PROFILE_KEYS)}")
        try:
            profile = ClientProfile(**{k: float(values[k]) for k in PROFILE_KEYS})
        except (TypeError, ValueError):
            raise FedsimInputError(f"{path}: client {key}: values must be numbers") from None
        if not (profile.speed > 0 and profile.bandwidth_mbps > 0 and 0 <= profile.dropout <= 1):
            raise FedsimInputError(
                f"{path}: client {key}: speed and bandwidth_mbps must be > 0, dropout in [0, 1]"
            )
        profiles[int(key)] = profile
    return profiles
