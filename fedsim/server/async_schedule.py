"""Asynchronous training on the simulated clock: the event schedule, computed before any training.

In `server.mode: async` (FedBuff, Nguyen et al. AISTATS 2022; FedAsync, Xie et al. 2019) at most
`concurrency` clients train at any simulated moment, and the server applies an update every
`buffer_size` (K) finished clients. Simulated durations come from the seeded system model, never
from real execution, so the whole schedule -- which client starts when, from which global version,
which finished updates make up server step N and how stale each is -- is a pure function of
(config, seed). This module computes it, lazily and cheaply (arithmetic only); the driver then
executes it in any real order with any number of workers and gets the same bits.

The rules, exactly:

- At time 0, `concurrency` dispatches start from version 0. Dispatches are numbered 0, 1, 2, ...
  in the order they start. Dispatch d starts an idle client (one not in flight) chosen uniformly
  by draw d of `Stream.ASYNC_SELECTION`; a client may be dispatched again once it has finished.
- A dispatch's duration is the system model's `client_seconds` for its client (compute + adapter
  down and up). The device is a property of the client (`Stream.CLIENT_PROFILE`), so every
  dispatch of a client takes the same time, as in synchronous rounds; what is drawn per dispatch
  is whether it drops out (draw d of `Stream.ASYNC_DROPOUT` against the client's dropout).
- A dispatch ends in one of three ways. `update`: at start + duration its update joins the
  buffer. `straggler` (duration > `deadline_seconds`): the server gives up on it at start +
  deadline. `dropped_out`: the server learns of it at start + deadline, or at start + duration
  when there is no deadline. Stragglers and dropouts are wasted: never trained, counted.
- Events at one simulated instant are handled in dispatch order: each ending dispatch frees its
  slot and, if an update, joins the buffer; whenever the buffer holds K updates, server step v+1
  happens at that instant and the buffer empties. Only when every event of the instant is handled
  are the freed slots refilled, all from the version current after the instant. So simultaneous
  finishes are ordered by dispatch index, one instant may produce several steps, and an update
  that joins the buffer after a step at the same instant is stale by that step.
- Staleness of an update applied by step v+1: v - its start version (0: nothing happened since
  it started). Its weight is its sample weight times the staleness factor (`StalenessRule`).

State is per in-flight dispatch (a heap of at most `concurrency` entries, a sorted list of busy
client ids, the buffer), never per registered client. Resuming at server version N re-simulates
from 0, which costs little (see docs/async.md for the measurement).
"""

from __future__ import annotations

import bisect
import heapq
import math
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from fedsim.config import StalenessRuleName
from fedsim.seeds import Stream, generator, seed_of
from fedsim.server.system_model import SystemModel

Outcome = Literal["update", "dropped_out", "straggler"]
RULES: tuple[str, ...] = typing.get_args(StalenessRuleName)

NO_PROGRESS_LIMIT = 100_000
"""Dispatches in a row that may end without an update before the schedule gives up: a run whose
clients all drop out or miss the deadline would otherwise loop forever."""


# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class StalenessRule:
    """How much an update of staleness s counts (Xie et al. 2019, "Asynchronous Federated
    Optimization", Sec. 5.2; the same functions as APPFL's FedAsync/FedBuff aggregators):

    - `constant`: s(t - tau) = 1
    - `polynomial`: s_a(t - tau) = (t - tau + 1)^-a  (FedBuff's experiments: a = 0.5, i.e.
      1/sqrt(1 + staleness))
    - `hinge`: s_ab(t - tau) = 1 if t - tau <= b, else 1 / (a (t - tau - b) + 1)

    with t - tau the staleness. Every factor lies in (0, 1], and is 1 at staleness 0."""

    rule: str = "constant"
    """`constant`, `polynomial` or `hinge`."""
    a: float = 0.5
    """Exponent of `polynomial`; slope of `hinge` past b."""
    b: float = 4.0
    """Staleness up to which `hinge` keeps the full weight."""

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each (empty when nothing is)."""
        found = []
        if self.rule not in RULES:
            found.append(f"staleness.rule: {self.rule!r}, expected one of {', '.join(RULES)}")
        if not (math.isfinite(self.a) and self.a >= 0):
            found.append(f"staleness.a: {self.a}, expected a finite number >= 0")
        if not (math.isfinite(self.b) and self.b >= 0):
            found.append(f"staleness.b: {self.b}, expected a finite number >= 0")
        return found

    def factor(self, staleness: int) -> float:
        """The weight factor of an update `staleness` server steps old."""
        if staleness < 0:
            raise ValueError(f"staleness {staleness} < 0")
        if self.rule == "polynomial":
            return float((1.0 + staleness) ** -self.a)
        if self.rule == "hinge" and staleness > self.b:
            return 1.0 / (self.a * (staleness - self.b) + 1.0)
        return 1.0


@dataclass(frozen=True)
class AsyncScheduleConfig:
    """What decides the schedule (the lead maps `server.mode: async` settings onto it)."""

    num_clients: int
    """Registered clients, ids 0 .. num_clients - 1."""
    concurrency: int
    """Clients in training at any simulated moment (FedBuff's concurrency C)."""
    buffer_size: int = 10
    """Updates per server step (FedBuff's K); 1 with a mixing rate (server lr) is FedAsync."""
    staleness: StalenessRule = field(default_factory=StalenessRule)
    """How stale updates are weighted."""
    deadline_seconds: float | None = None
    """`system.deadline_seconds`: a dispatch longer than this is a straggler, given up on at the
    deadline; dropouts are noticed at the deadline. None: no deadline."""

    def __post_init__(self) -> None:
        found = self.staleness.problems()
        if self.num_clients < 1:
            found.append(f"num_clients: {self.num_clients}, expected >= 1")
        if not 1 <= self.concurrency <= self.num_clients:
            found.append(
                f"concurrency: {self.concurrency}, expected 1 .. num_clients ({self.num_clients})"
            )
        if self.buffer_size < 1:
            found.append(f"buffer_size: {self.buffer_size}, expected >= 1")
        if self.deadline_seconds is not None and not self.deadline_seconds > 0:
            found.append(f"deadline_seconds: {self.deadline_seconds}, expected > 0 or None")
        if found:
            raise ValueError("\n".join(found))


# --- client timing --------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """One dispatch of a client: its simulated seconds and its probability of dropping out."""

    seconds: float
    dropout: float


class ClientTiming(Protocol):
    """Client id -> its `Timing`; a pure function of the client (and the run's seed)."""

    def __call__(self, client: int) -> Timing: ...


@dataclass(frozen=True)
class SystemTiming:
    """`ClientTiming` from the system model: `client_seconds` for the client's local steps and
    the run's adapter size, and its profile's dropout probability."""

    system: SystemModel
    local_steps: Callable[[int], int]
    adapter_bytes: int

    def __call__(self, client: int) -> Timing:
        seconds = self.system.client_seconds(client, self.local_steps(client), self.adapter_bytes)
        return Timing(seconds, self.system.profile(client).dropout)


def dispatch_seed(seed: int, dispatch: int) -> int:
    """The seed of one dispatch's local training (for the trainer, like `client_seed`)."""
    return seed_of(seed, Stream.ASYNC_TRAINING, dispatch)


# --- the schedule's records -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One client's turn: started at `start_time` from global version `start_version`; its slot
    frees at `end_time`, with an update or wasted (`outcome`)."""

    index: int
    client: int
    start_version: int
    start_time: float
    end_time: float
    outcome: Outcome

    def to_json(self) -> dict[str, Any]:
        return {
            "dispatch": self.index,
            "client": self.client,
            "start_version": self.start_version,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "outcome": self.outcome,
        }


@dataclass(frozen=True, slots=True)
class Update:
    """A finished dispatch as one of a server step's K updates."""

    dispatch: Dispatch
    staleness: int
    """Server steps between its start version and the version the step is applied to."""

    @property
    def client(self) -> int:
        return self.dispatch.client

    @property
    def start_version(self) -> int:
        return self.dispatch.start_version

    def to_json(self) -> dict[str, Any]:
        d = self.dispatch
        return {
            "client": d.client,
            "dispatch": d.index,
            "start_version": d.start_version,
            "staleness": self.staleness,
            "start_time": d.start_time,
            "finish_time": d.end_time,
        }


@dataclass(frozen=True, slots=True)
class Totals:
    """Counts since time 0, at a server step."""

    dispatched: int
    updates: int
    dropped_out: int
    stragglers: int

    @property
    def wasted(self) -> int:
        return self.dropped_out + self.stragglers


@dataclass(frozen=True)
class ServerStep:
    """Server step `version`: it turns global version `version - 1` into `version`."""

    version: int
    time: float
    """Simulated seconds since the start of the run."""
    updates: tuple[Update, ...]
    """The K updates, in buffer order (simulated finish time, then dispatch index)."""
    started: tuple[Dispatch, ...]
    """Every dispatch that starts from version `version - 1` (the driver launches them once it
    holds that version); each is later an update of some step or wasted."""
    wasted: tuple[Dispatch, ...]
    """Dispatches that ended without an update since the previous step."""
    oldest_needed: int
    """After this step, no dispatch still to be folded starts from a version older than this:
    the driver may drop every global version below it."""
    totals: Totals

    def to_json(self) -> dict[str, Any]:
        """The schedule's part of round.json: which clients, from which versions, when."""
        return {
            "version": self.version,
            "simulated_clock": self.time,
            "updates": [u.to_json() for u in self.updates],
            "wasted": [d.to_json() for d in self.wasted],
            "oldest_needed_version": self.oldest_needed,
        }


# --- the simulation -------------------------------------------------------------------------


class _Uniforms:
    """The stream's uniform draws one at a time, generated in blocks: numpy yields the same
    sequence whatever the block size, so draw d is always the stream's d-th number."""

    BLOCK = 4096

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._block: list[float] = []
        self._next = 0

    def draw(self) -> float:
        if self._next == len(self._block):
            self._block = self._rng.random(self.BLOCK).tolist()
            self._next = 0
        self._next += 1
        return self._block[self._next - 1]


class _Simulation:
    """The event simulation's state; `run` yields each server step as it forms, leaving the
    state at that moment for `pending` (the rest of the instant is handled on the next step)."""

    def __init__(self, config: AsyncScheduleConfig, seed: int, timing: ClientTiming) -> None:
        self.config, self.timing = config, timing
        self.choices = _Uniforms(generator(seed, Stream.ASYNC_SELECTION))
        self.dropouts = _Uniforms(generator(seed, Stream.ASYNC_DROPOUT))
        self.in_flight: list[tuple[float, int, Dispatch]] = []  # heap by (end time, index)
        self.busy: list[int] = []  # sorted ids of the clients in flight
        self.version, self.dispatched = 0, 0
        self.buffer: list[Dispatch] = []
        self.started: list[Dispatch] = []
        self.wasted: list[Dispatch] = []
        self.counts: Counter[str] = Counter()
        self.without_update = 0

    def run(self) -> Iterator[ServerStep]:
        self.refill(0.0)
        while True:
            now = self.in_flight[0][0]
            while self.in_flight and self.in_flight[0][0] == now:
                ended = heapq.heappop(self.in_flight)[2]
                self.busy.pop(bisect.bisect_left(self.busy, ended.client))
                if self.end(ended):
                    yield self.step(now)
            self.refill(now)

    def end(self, d: Dispatch) -> bool:
        """Handle a dispatch whose slot frees; whether the buffer is now full."""
        self.counts[d.outcome] += 1
        if d.outcome != "update":
            self.wasted.append(d)
            self.without_update += 1
            if self.without_update >= NO_PROGRESS_LIMIT:
                raise RuntimeError(
                    f"{NO_PROGRESS_LIMIT} dispatches in a row ended without an update (dropped out"
                    " or past the deadline): check system.dropout and system.deadline_seconds"
                )
            return False
        self.without_update = 0
        self.buffer.append(d)
        return len(self.buffer) == self.config.buffer_size

    def step(self, now: float) -> ServerStep:
        base = self.version
        self.version += 1
        updates = tuple(Update(d, base - d.start_version) for d in self.buffer)
        c = self.counts
        step = ServerStep(
            version=self.version,
            time=now,
            updates=updates,
            started=tuple(self.started),
            wasted=tuple(self.wasted),
            oldest_needed=self.oldest_pending(),
            totals=Totals(self.dispatched, c["update"], c["dropped_out"], c["straggler"]),
        )
        self.buffer, self.started, self.wasted = [], [], []
        return step

    def oldest_pending(self) -> int:
        """The oldest start version of a pending dispatch (the buffer is empty after a step)."""
        versions = (e[2].start_version for e in self.in_flight if e[2].outcome == "update")
        return min(versions, default=self.version)

    def pending(self) -> list[Dispatch]:
        """The dispatches that will produce updates not folded yet (buffered or in flight)."""
        flying = (e[2] for e in self.in_flight if e[2].outcome == "update")
        return sorted([*self.buffer, *flying], key=lambda d: d.index)

    def refill(self, now: float) -> None:
        """Start a dispatch in every free slot, from the current version."""
        while len(self.in_flight) < self.config.concurrency:
            client = self.choose()
            timing = self.timing(client)
            deadline = self.config.deadline_seconds
            outcome: Outcome = "update"
            seconds = timing.seconds
            if self.dropouts.draw() < timing.dropout:
                outcome, seconds = "dropped_out", seconds if deadline is None else deadline
            elif deadline is not None and seconds > deadline:
                outcome, seconds = "straggler", deadline
            d = Dispatch(self.dispatched, client, self.version, now, now + seconds, outcome)
            heapq.heappush(self.in_flight, (d.end_time, d.index, d))
            bisect.insort(self.busy, client)
            self.started.append(d)
            self.dispatched += 1

    def choose(self) -> int:
        """The idle client of this dispatch's draw: the j-th id not in flight, j uniform."""
        idle = self.config.num_clients - len(self.busy)
        j = min(int(self.choices.draw() * idle), idle - 1)  # u * idle may round up to idle
        x = j
        while True:  # the least x with x = j + #busy ids <= x is the j-th idle id
            moved = j + bisect.bisect_right(self.busy, x)
            if moved == x:
                return x
            x = moved


class AsyncSchedule:
    """The schedule of one run: a pure function of (config, seed, client timing).

    Every call re-simulates from time 0, so any step can be asked for at any time (a resumed
    driver asks for steps N+1 onwards); state is per in-flight client, never per registered one.
    """

    def __init__(self, config: AsyncScheduleConfig, seed: int, timing: ClientTiming) -> None:
        self.config, self.seed, self.timing = config, seed, timing

    def steps(self, first: int = 1, last: int | None = None) -> Iterator[ServerStep]:
        """Server steps `first` .. `last` (endless without `last`), lazily, in order."""
        if first < 1:
            raise ValueError(f"server steps start at 1, got first={first}")
        for step in _Simulation(self.config, self.seed, self.timing).run():
            if last is not None and step.version > last:
                return
            if step.version >= first:
                yield step

    def step(self, version: int) -> ServerStep:
        """One server step."""
        return next(self.steps(version, version))

    def pending_after(self, version: int) -> tuple[Dispatch, ...]:
        """The dispatches in flight or buffered right after step `version` that will produce
        updates: what a driver resumed from version `version` must (re)train, each from its own
        start version, before it can run step `version + 1` (whose `started` lists the rest)."""
        if version == 0:
            return ()
        sim = _Simulation(self.config, self.seed, self.timing)
        for step in sim.run():
            if step.version == version:
                return tuple(sim.pending())
        raise AssertionError("unreachable: the simulation is endless")

    def oldest_needed_version(self, after_step: int) -> int:
        """The oldest global version still needed once step `after_step` is applied."""
        return self.step(after_step).oldest_needed if after_step > 0 else 0


# --- weights --------------------------------------------------------------------------------

FOLD_SCALE_BITS = 30
"""Integer fold weights are n_i * s(tau_i) on a grid of 2^-30 (see `StepWeights.fold_weights`)."""


@dataclass(frozen=True)
class StepWeights:
    """How much each of a step's updates counts.

    FedBuff (Nguyen et al. 2022, Alg. 1) sums the buffered client deltas, each scaled by its
    staleness factor, and divides by K -- not by the sum of the factors, so stale updates shrink
    the step instead of merely re-sharing it (dividing by the factors would also cancel the
    factor altogether when K = 1). With sample weights n_i (1 each under `server.weighting:
    uniform`, which is FedBuff exactly) fedsim divides by their sum:

        g_v = g_{v-1} + lr * sum_i c_i * (x_i - g_{start_i}),   c_i = n_i s(tau_i) / sum_j n_j

    each delta taken against its own start version. With K = 1 and lr = alpha this is FedAsync's
    mixing rate alpha_t = alpha * s(tau) (Xie et al. 2019, Alg. 1), applied to the delta from the
    client's start version as FedBuff and FLSim's default `fed_buff_aggregation` do."""

    samples: tuple[int, ...]
    factors: tuple[float, ...]

    @property
    def coefficients(self) -> tuple[float, ...]:
        """c_i = n_i s(tau_i) / sum_j n_j."""
        total = sum(self.samples)
        return tuple(n * s / total for n, s in zip(self.samples, self.factors, strict=True))

    def fold_weights(self, scale_bits: int = FOLD_SCALE_BITS) -> tuple[list[int], int]:
        """Integer weights round(n_i s_i 2^bits) (at least 1) and the denominator sum n_j 2^bits,
        for the exact fold (`WeightedDeltaSum(reference, denominator)`, `add(..., weight)`,
        `mean(denominator)`): the factors are rounded once, here, so the fold stays order-free.
        Since s_i <= 1, the weights never sum past the denominator."""
        unit = 1 << scale_bits
        weights = [
            max(1, round(n * s * unit)) for n, s in zip(self.samples, self.factors, strict=True)
        ]
        return weights, sum(self.samples) * unit


def step_weights(
    step: ServerStep, rule: StalenessRule, sample_weight: Callable[[int], int]
) -> StepWeights:
    """The weights of a step's updates: `sample_weight(client)` (its sample count, or 1) times
    the staleness factor."""
    return StepWeights(
        tuple(sample_weight(u.client) for u in step.updates),
        tuple(rule.factor(u.staleness) for u in step.updates),
    )


# --- metrics --------------------------------------------------------------------------------


def staleness_histogram(step: ServerStep) -> dict[int, int]:
    """Staleness -> number of the step's updates that stale, in ascending staleness."""
    return dict(sorted(Counter(u.staleness for u in step.updates).items()))


def updates_per_simulated_hour(step: ServerStep) -> float:
    """Updates applied up to this step per simulated hour since time 0."""
    applied = step.version * len(step.updates)
    return applied * 3600.0 / step.time if step.time > 0 else math.inf


def wasted_fraction(step: ServerStep) -> float:
    """Of the dispatches that have ended by this step, the share that dropped out or straggled."""
    t = step.totals
    ended = t.updates + t.wasted
    return t.wasted / ended if ended else 0.0


def step_metrics(step: ServerStep) -> dict[str, Any]:
    """The schedule's numbers for a step's metrics line (its `round` is the version): the
    simulated clock since time 0, the staleness of its updates, the pace and the waste so far."""
    stale = [u.staleness for u in step.updates]
    return {
        "simulated_clock": step.time,
        "staleness_histogram": {str(s): n for s, n in staleness_histogram(step).items()},
        "staleness_mean": sum(stale) / len(stale),
        "staleness_max": max(stale),
        "updates_per_simulated_hour": updates_per_simulated_hour(step),
        "wasted_fraction": wasted_fraction(step),
        "dispatched": step.totals.dispatched,
        "dropped_out": step.totals.dropped_out,
        "stragglers": step.totals.stragglers,
    }
