"""Asynchronous training (`server.mode: async`) on Ray: the simulated-clock schedule, executed.

The schedule (fedsim/server/async_schedule.py) is computed from the config and the seed before
any training: which client starts when, from which global version, which K finished updates
make server step v, and how stale each one is. This module only executes it, so the adapters
are the same bits whatever the number of workers and whatever order they finish in. Server
step v, top to bottom (`StepRunner.run_step`):

1. launch: train every dispatch that starts from version v - 1 (its client, from that version's
   adapter, with its own dispatch seed); each update waits in the object store until the step
   that folds it;
2. fold: the aggregator folds the K updates of step v, each decoded against its own start
   version, with integer weights n_i s(tau_i) 2^30 (the exact, order-free fold);
3. finish: the strategy applies the mean delta with server.lr, rounds/round_v is written in
   the background, and the versions no pending update starts from are dropped;
4. commit: once that checkpoint is on disk, the step's metrics line (staleness, simulated
   clock, updates per simulated hour, wasted fraction).

A run resumed from version N (after a SIGKILL of the driver, or when its aggregator died)
recomputes the schedule, trains the dispatches that were in flight at N again, each from its own
start version (rounds/round_<start>, or the initial adapter), and goes on with step N + 1.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsim import checkpoint
from fedsim.config import ExperimentConfig, StalenessConfig
from fedsim.driver import (
    MAX_ROUND_ATTEMPTS,
    AggregatorLost,
    RoundRunner,
    _aggregator_call,
    _client_info,
    _eta,
    _round_line,
    client_contexts,
)
from fedsim.errors import FedsimInputError
from fedsim.execution import TaskInputLost
from fedsim.protocol import ClientOutcome, ClientTask
from fedsim.server.async_schedule import (
    FOLD_SCALE_BITS,
    AsyncSchedule,
    AsyncScheduleConfig,
    Dispatch,
    ServerStep,
    StalenessRule,
    StepWeights,
    SystemTiming,
    dispatch_seed,
    step_metrics,
    step_weights,
)


def staleness_rule(settings: StalenessConfig) -> StalenessRule:
    """`server.staleness` as the schedule's rule."""
    return StalenessRule(settings.rule, settings.a, settings.b)


def schedule_of(cfg: ExperimentConfig, rounds: RoundRunner) -> AsyncSchedule:
    """The run's schedule: its clients' simulated durations come from the system model, for
    their local steps and the run's adapter size (known once the aggregator holds it)."""
    assert rounds.system is not None and cfg.server.concurrency is not None  # validated
    settings = AsyncScheduleConfig(
        num_clients=cfg.data.num_clients,
        concurrency=cfg.server.concurrency,
        buffer_size=cfg.server.buffer_size,
        staleness=staleness_rule(cfg.server.staleness),
        deadline_seconds=cfg.system.deadline_seconds,
    )

    def local_steps(client: int) -> int:
        return rounds.train_settings.num_steps(rounds.sample_counts[client])

    timing = SystemTiming(rounds.system, local_steps, rounds.adapter_bytes)
    return AsyncSchedule(settings, cfg.run.seed, timing)


def run_steps(rounds: RoundRunner, start: int, end: int, state: Any, workers: int) -> None:
    """Server steps `start`..`end` of an asynchronous run (see the module docstring). A step's
    metrics line is committed only once its checkpoint is on disk. An aggregator that dies is
    replaced from the newest step on disk, and the steps after it are redone."""
    cfg = rounds.cfg
    rounds.log(
        f"run {rounds.run_dir}: {cfg.data.num_clients} clients, asynchronous: "
        f"{cfg.server.concurrency} in flight, {cfg.server.buffer_size} updates a step, "
        f"{workers} workers, server steps {start}..{end}"
    )
    aggregator, global_ref = rounds.new_aggregator(start - 1, state)
    steps = StepRunner(rounds, schedule_of(cfg, rounds), staleness_rule(cfg.server.staleness))
    version, failures = start - 1, 0
    try:
        while version < end:
            try:
                steps.restart(version, global_ref, aggregator)
                for step in steps.schedule.steps(version + 1, end):
                    global_ref = steps.run_step(step, aggregator)
                    version, failures = step.version, 0
            except AggregatorLost as err:
                failures += 1
                if failures >= MAX_ROUND_ATTEMPTS:
                    raise RuntimeError(
                        f"step {version + 1}: the aggregator failed {failures} times"
                    ) from err
                aggregator, global_ref, redo = rounds.replace_aggregator(
                    aggregator, version + 1, err
                )
                version = redo - 1
        rounds.commits.written(_aggregator_call(aggregator.flush.remote()))
    except KeyboardInterrupt:
        rounds.flush_quietly(aggregator)  # keep the step already trained, if it lands quickly
        raise


@dataclass
class StepRunner:
    """The state an asynchronous run carries from step to step: the global versions still
    needed, and the updates trained but not folded yet."""

    rounds: RoundRunner
    schedule: AsyncSchedule
    rule: StalenessRule
    versions: dict[int, Any] = field(default_factory=dict)
    """Global version -> the reference of its adapter, for every version a pending update
    starts from (and the current one)."""
    trained: dict[int, tuple[ClientOutcome, Any]] = field(default_factory=dict)
    """Dispatch index -> (its outcome, where its upload is: the reference of its batch's
    uploads, its place there and their number; None when it failed)."""
    clock: float = 0.0
    """Simulated seconds at the current version."""
    launched: list[int] = field(default_factory=list)
    """Dispatches trained for the step being run."""
    launched_seconds: float = 0.0
    """Their training seconds, summed (as the workers measured them)."""

    # --- resume ---------------------------------------------------------------------------

    def restart(self, version: int, global_ref: Any, aggregator: Any) -> None:
        """Hold `version` (the aggregator's global adapter, `global_ref`) and train again the
        updates in flight at it, each from its own start version: nothing survives a restart
        but the checkpoints, and training is a function of the start version and the seed."""
        self.trained.clear()
        self.versions = {version: global_ref}
        self.clock = self.schedule.step(version).time if version else 0.0
        pending = self.schedule.pending_after(version)
        for start in sorted({d.start_version for d in pending}):
            if start not in self.versions:
                self.versions[start] = self._version_from_disk(start, version, aggregator)
            self.launch([d for d in pending if d.start_version == start], aggregator)

    def _version_from_disk(self, start: int, version: int, aggregator: Any) -> Any:
        """The global adapter of version `start`: the seed's initial one, or round_<start>."""
        if start == 0:
            return self.rounds.pool.first().initial_adapter.remote()
        path = self.rounds.run_dir / checkpoint.ROUNDS_DIR / checkpoint.round_name(start)
        problem = checkpoint.verify_round(path)
        if problem is not None:
            raise FedsimInputError(
                f"resume: {path.name} is needed (clients in flight after step {version} "
                f"started from it), but {problem}"
            )
        return aggregator.read_adapter.remote(str(path))  # the driver never holds tensors

    # --- one server step ------------------------------------------------------------------

    def run_step(self, step: ServerStep, aggregator: Any) -> Any:
        """Launch, fold, finish and commit server step `step.version`; returns the reference of
        the new global adapter."""
        rounds, v = self.rounds, step.version
        started = time.perf_counter()
        # --- launch: every dispatch that starts from version v - 1 ---
        self.launched, self.launched_seconds = [], 0.0
        self.launch(step.started, aggregator)
        # --- fold: the K updates, each against the version it started from ---
        weights = step_weights(step, self.rule, self._sample_weight)
        fold, _ = weights.fold_weights()
        keys = [u.dispatch.index for u in step.updates]
        units = [n << FOLD_SCALE_BITS for n in weights.samples]
        _aggregator_call(
            aggregator.begin_step.remote(v, dict(zip(keys, fold, strict=True)),
                                         dict(zip(keys, units, strict=True)))
        )  # fmt: skip
        outcomes: list[ClientOutcome] = []
        batches: dict[Any, tuple[list[int | None], int]] = {}  # uploads ref -> (keys, version)
        for u in step.updates:
            outcome, upload = self.trained.pop(u.dispatch.index)
            outcomes.append(outcome)
            if upload is not None:  # fold it from its batch of uploads, with its start version
                ref, position, size = upload
                keys, _ = batches.setdefault(ref, ([None] * size, u.start_version))
                keys[position] = u.dispatch.index
        folds = [
            aggregator.fold_batch.remote(keys, ref, self.versions[version])
            for ref, (keys, version) in batches.items()
        ]
        for ref in folds:
            _aggregator_call(ref)
        # --- finish: apply, checkpoint in the background, drop the versions no longer needed ---
        trained = rounds.measure(v, outcomes, started, None)
        trained = dataclasses.replace(trained, simulated_seconds=round(step.time - self.clock, 6))
        details = self._details(step, weights, outcomes)
        summary, global_ref = rounds.finish(aggregator, trained, details)
        self.versions[v] = global_ref
        for old in [x for x in self.versions if x < step.oldest_needed]:
            del self.versions[old]
        self.clock = step.time
        # --- commit once the checkpoint is on disk ---
        record = {**summary["record"], **step_metrics(step), **rounds.probe_round(v, global_ref)}
        self._report(record, step, outcomes)
        rounds.commits.trained(record, summary["checkpoints_written"])
        return global_ref

    def launch(self, dispatches: Sequence[Dispatch], aggregator: Any) -> None:
        """Train the dispatches that end with an update (wasted ones never train), all from one
        version; their outcomes and uploads wait in `trained` until their step folds them."""
        todo = [d for d in dispatches if d.outcome == "update"]
        while todo:
            # A client can be dispatched twice from one version (it finished and was drawn
            # again before the step): the pool trains a client once per batch.
            seen: set[int] = set()
            batch = [d for d in todo if not (d.client in seen or seen.add(d.client))]
            todo = [d for d in todo if d not in batch]
            self._train(batch, aggregator)

    def _train(self, batch: list[Dispatch], aggregator: Any) -> None:
        rounds = self.rounds
        global_ref = self.versions[batch[0].start_version]
        clients = [d.client for d in batch]
        by_ref = rounds.cfg.cluster.data_transport == "object_store"
        rounds.shards.ensure(clients)
        if by_ref:  # the object store holds the blocks of this batch's clients only
            rounds.shards.keep_refs(clients)
        seed = rounds.cfg.run.seed
        tasks = [
            ClientTask(
                d.start_version + 1,  # the step that launches it (fault tests name it)
                d.client,
                dispatch_seed(seed, d.index),
                shard_ref=rounds.shards.object_ref(d.client) if by_ref else None,
            )
            for d in batch
        ]
        contexts = client_contexts(aggregator, clients, rounds.ranks)
        uploads: dict[int, tuple[Any, int, int]] = {}

        def keep(succeeded: list[ClientTask], uploads_ref: Any) -> None:
            for position, task in enumerate(succeeded):
                uploads[task.client_id] = (uploads_ref, position, len(succeeded))

        try:
            outcomes = rounds.pool.run(
                tasks, global_ref, keep, rounds.policy, rounds.log, rounds.show_progress, contexts
            )
        except TaskInputLost as err:  # the contexts (and versions) come from the aggregator
            raise AggregatorLost(str(err)) from None
        for d, outcome in zip(batch, outcomes, strict=True):
            self.trained[d.index] = (outcome, uploads.get(d.client))
            self.launched.append(d.index)
            self.launched_seconds += outcome.train_seconds

    def _sample_weight(self, client: int) -> int:
        """n_i: the client's record count, or 1 under `server.weighting: uniform`."""
        if self.rounds.cfg.server.weighting == "uniform":
            return 1
        return self.rounds.sample_counts[client]

    # --- the step's record ----------------------------------------------------------------

    def _details(
        self, step: ServerStep, weights: StepWeights, outcomes: list[ClientOutcome]
    ) -> dict[str, Any]:
        """round.json's account of the step beyond its record: the schedule's part (each
        update's client, dispatch, start version, staleness, simulated start and finish, its
        staleness factor and coefficient c_i), the wasted dispatches and the clock."""
        schedule = step.to_json()
        for entry, factor, c in zip(
            schedule["updates"], weights.factors, weights.coefficients, strict=True
        ):
            entry["staleness_factor"] = factor
            entry["coefficient"] = c
        results = [
            {**_client_info(o), "dispatch": u.dispatch.index}
            for u, o in zip(step.updates, outcomes, strict=True)
        ]
        return {
            "client_results": results,
            "bytes_downlink": self.rounds.adapter_bytes * len(self.launched),
            "async": {
                **schedule,
                **step_metrics(step),
                "launched": sorted(self.launched),
                "launched_train_seconds": round(self.launched_seconds, 4),
            },
        }

    def _report(
        self, record: dict[str, Any], step: ServerStep, outcomes: list[ClientOutcome]
    ) -> None:
        rounds, total = self.rounds, self.rounds.cfg.run.rounds
        for u, o in zip(step.updates, outcomes, strict=True):
            if o.error:
                rounds.log(f"client {o.client_id} (dispatch {u.dispatch.index}) failed:\n"
                           f"{o.error.rstrip()}")  # fmt: skip
        rounds.reported_at.append(time.perf_counter())
        line = "step" + _round_line(record, total, outcomes).removeprefix("round")
        line += (
            f" | staleness {record['staleness_mean']:.2f} (max {record['staleness_max']})"
            f" | simulated clock {clock_text(record['simulated_clock'])}"
        )
        rounds.log(line + _eta(rounds.reported_at, record, total))


def clock_text(seconds: float) -> str:
    """Simulated seconds as the round line shows them: 42.0 s, 12.5 min, 3.20 h."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
