"""The round loop on Ray: prepare the run, start the worker pool and the aggregator, run rounds.

`run_experiment` reads top to bottom in three phases:

1. prepare (fedsim/prepare.py) — everything that can fail on bad input (config, run directory,
   data, model) fails here, before Ray starts or the run directory is touched;
2. materialise (fedsim/prepare.py) — write config.yaml, partition.json and the shard index;
3. rounds — on Ray (`run_rounds`, one round top to bottom): select clients, plan them with the
   system model, build their shard blocks, let free workers train them while their updates
   stream into the aggregator, finish the round, and commit it once its checkpoint is on disk.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedsim import checkpoint
from fedsim.actors import AggregatorActor
from fedsim.client.spec import TrainSettings, WorkerSpec
from fedsim.config import ExperimentConfig, clients_per_round
from fedsim.data.profiles import ClientProfile
from fedsim.data.shard_builder import ShardBuilder
from fedsim.eval.probe import HeldoutProbe
from fedsim.execution import (
    FailurePolicy,
    TaskInputLost,
    WorkerPool,
    ray_session,
    worker_pool,
)
from fedsim.faults import forwarded_env
from fedsim.model_files import load_tokenizer
from fedsim.prepare import (
    Log,
    PreparedRun,
    _print,
    availability_probabilities,
    materialise,
    prepare_run,
    shard_builder,
)
from fedsim.protocol import ClientOutcome, ClientTask
from fedsim.resources import peak_rss_mb, round_object_store_bytes
from fedsim.round_record import TrainedRound
from fedsim.seeds import STREAMS_VERSION
from fedsim.server.client_state import ClientStateStore
from fedsim.server.selection import (
    Selection,
    client_seed,
    over_selection,
    select_round,
)
from fedsim.server.system_model import RoundPlan, SystemModel
from fedsim.tracking import train_tracker

MAX_ROUND_ATTEMPTS = 3
"""How often a round is redone after its aggregator died before the run gives up."""
INTERRUPT_FLUSH_S = 5.0
"""On Ctrl-C, how long to wait for the checkpoint being written in the background."""


@dataclass
class RunResult:
    """What `run_experiment` did: the run directory and the rounds it completed."""

    run_dir: Path
    first_round: int
    last_round: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    ray_left_running: bool = False
    """The local Ray instance was left for the process's exit to end (`exit_follows`)."""


# ------------------------------------------------------------------------------------------
# Phase 3: Ray
# ------------------------------------------------------------------------------------------


def worker_spec(
    cfg: ExperimentConfig, model_path: str, shards_dir: Path, pad_id: int
) -> WorkerSpec:
    c = cfg.client
    return WorkerSpec(
        model_path=model_path,
        model_name=cfg.model.name_or_path if cfg.model.name_or_path != "tiny" else model_path,
        dtype=cfg.model.dtype,
        lora=cfg.model.lora,
        seed=cfg.run.seed,
        shards_dir=str(shards_dir.resolve()),
        backend=c.backend,
        settings=TrainSettings(c, pad_token_id=pad_id),
        num_threads=max(1, int(cfg.cluster.cpus_per_worker)),
        device="cuda" if cfg.cluster.gpus_per_worker > 0 else "cpu",
        quantization=cfg.model.quantization,
        compression=c.compression,
    )


def run_experiment(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    log: Log = _print,
    show_progress: bool = True,
    exit_follows: bool = False,
) -> RunResult:
    """Run (or resume) the experiment described by `cfg`; see the module docstring.
    `exit_follows`: the caller ends the process right after (`execution.end_process`), so a
    local Ray instance is left to end with it (see `execution.ray_session`)."""
    # --- 1. prepare: every input error surfaces here ---
    prep = prepare_run(
        cfg, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change, log=log
    )
    start_round = prep.resume_from.round_idx + 1 if prep.resume_from else 1
    result = RunResult(prep.run_dir, start_round, start_round - 1)
    if start_round > cfg.run.rounds:
        log(f"{prep.run_dir} already has {start_round - 1} rounds (run.rounds={cfg.run.rounds})")
        return result

    # --- 2. materialise the run directory ---
    shards_dir = materialise(prep, overwrite=overwrite, log=log)
    if prep.resume_from:
        checkpoint.truncate_metrics(prep.run_dir, prep.resume_from.round_idx)
        # `latest` may name a damaged round about to be redone: point it at the intact one first
        checkpoint.point_latest(prep.run_dir, prep.resume_from.round_idx)
        log(f"resuming {prep.run_dir} after round {prep.resume_from.round_idx}")
    pad_id = load_tokenizer(prep.model_path).pad_token_id
    spec = worker_spec(cfg, prep.model_path, shards_dir, pad_id)
    per_round = clients_per_round(cfg)
    if cfg.server.mode == "async" and cfg.server.concurrency:  # the most that train at once
        per_round = cfg.server.concurrency
    if prep.resume_from:  # finish a client-state commit that a crash cut short
        ClientStateStore(prep.run_dir).settle(prep.resume_from.round_idx)

    # --- 3. rounds on Ray ---
    options: dict[str, Any] = {
        "num_cpus": cfg.cluster.cpus_per_worker,
        "num_gpus": cfg.cluster.gpus_per_worker,
    }
    options.update(forwarded_env())  # failure tests inject faults into the workers
    with (
        ray_session(cfg.cluster, exit_follows=exit_follows) as session,
        worker_pool(cfg, spec, per_round, options, log) as pool,
        shard_builder(prep, shards_dir, log) as shards,
        train_tracker(prep.run_dir, cfg) as scalars,  # TensorBoard, MLflow, W&B
    ):
        commits = Commits(prep.run_dir, result, scalars)
        rounds = _round_runner(prep, spec, pool, shards, commits, log, show_progress)
        if cfg.server.mode == "async":  # server steps on the simulated clock (docs/async.md)
            from fedsim.async_rounds import run_steps  # here: it builds on this module

            run_steps(rounds, start_round, cfg.run.rounds, prep.resume_from, len(pool.actors))
        else:
            log(
                f"run {prep.run_dir}: {cfg.data.num_clients} clients, {per_round} per round, "
                f"{len(pool.actors)} workers, rounds {start_round}..{cfg.run.rounds}"
            )
            run_rounds(rounds, start_round, cfg.run.rounds, prep.resume_from)
    result.ray_left_running = session.left_running
    return result


def _round_runner(
    prep: PreparedRun,
    spec: WorkerSpec,
    pool: WorkerPool,
    shards: ShardBuilder,
    commits: Commits,
    log: Log,
    show_progress: bool,
) -> RoundRunner:
    """The run's fixed parts, gathered for `run_rounds`."""
    cfg = prep.cfg
    return RoundRunner(
        cfg=cfg,
        run_dir=prep.run_dir,
        pool=pool,
        commits=commits,
        sample_counts=[len(c) for c in prep.data.clients],
        adapter_config=pool.first().adapter_config.remote(),
        provenance={
            "config_hash": cfg.training_hash(),
            "partition_hash": prep.data.partition_hash(),
            "random_streams": STREAMS_VERSION,
        },
        train_settings=spec.settings,
        shards=shards,
        policy=FailurePolicy(cfg.cluster.max_client_retries),
        probabilities=availability_probabilities(cfg, prep.profiles),
        ranks=[p.lora_rank for p in prep.profiles] if prep.profiles else None,
        system=_system_model(cfg, prep.profiles),
        probe=HeldoutProbe.of_run(cfg, prep.data.table, prep.data.test),
        log=log,
        show_progress=show_progress,
    )


class AggregatorLost(Exception):
    """The aggregator actor died; the round in flight must be redone."""


def _aggregator_call(ref: Any) -> Any:
    """ray.get on an aggregator call, turning its death into AggregatorLost and its errors
    (such as a checkpoint that could not be written) into the original exception."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as err:
        raise AggregatorLost(type(err).__name__) from None
    except ray.exceptions.RayTaskError as err:
        raise err.as_instanceof_cause() from None


def run_rounds(rounds: RoundRunner, start: int, end: int, state: Any) -> None:
    """Rounds `start`..`end`: select -> plan (system model) -> shards -> train and fold -> finish
    -> commit. A round's metrics line is committed only once its checkpoint, written in the
    background while the next round trains, is on disk. An aggregator that dies is replaced from
    the newest round on disk, and every round after that one is redone."""
    # selection is seeded: the first round's blocks are tokenised while the workers load the model
    rounds.shards.prefetch(rounds.select(start).clients)
    aggregator, global_ref = rounds.new_aggregator(start - 1, state)
    round_idx, failures = start, 0
    try:
        while round_idx <= end:
            started = time.perf_counter()
            try:
                selection = rounds.select(round_idx)
                clients, plan = rounds.plan(round_idx, selection.clients)
                tasks = rounds.shard_tasks(round_idx, clients)
                outcomes = rounds.train(round_idx, tasks, aggregator, global_ref)
                trained = rounds.measure(round_idx, outcomes, started, plan)
                details = rounds.details(outcomes, selection, plan)
                summary, global_ref = rounds.finish(aggregator, trained, details)
            except AggregatorLost as err:
                failures += 1
                if failures >= MAX_ROUND_ATTEMPTS:
                    raise RuntimeError(
                        f"round {round_idx}: the aggregator failed {failures} times"
                    ) from err
                aggregator, global_ref, round_idx = rounds.replace_aggregator(
                    aggregator, round_idx, err
                )
                continue
            failures = 0
            record = {**summary["record"], **rounds.probe_round(round_idx, global_ref)}
            rounds.report(record, outcomes)
            rounds.commits.trained(record, summary["checkpoints_written"])
            round_idx += 1
        rounds.commits.written(_aggregator_call(aggregator.flush.remote()))
    except KeyboardInterrupt:
        rounds.flush_quietly(aggregator)  # keep the round already trained, if it lands quickly
        raise


@dataclass
class Commits:
    """A round's metrics line is appended (and its scalars logged) only once its checkpoint is
    on disk: records of trained rounds wait here until the aggregator reports them written."""

    run_dir: Path
    result: RunResult
    scalars: Any
    unwritten: dict[int, dict[str, Any]] = field(default_factory=dict)

    def trained(self, record: dict[str, Any], written: list[dict[str, Any]]) -> None:
        self.unwritten[record["round"]] = record
        self.written(written)

    def written(self, written: list[dict[str, Any]]) -> None:
        for done in written:
            self.commit(self.unwritten.pop(done["round"]), done)

    def lost_after(self, last_on_disk: int) -> None:
        """The aggregator died: rounds up to `last_on_disk` did land; the others are redone."""
        for r in sorted(self.unwritten):
            record = self.unwritten.pop(r)
            if r <= last_on_disk:
                self.commit(record, None)

    def commit(self, record: dict[str, Any], done: dict[str, Any] | None) -> None:
        if done is not None:  # the cost of the round's checkpoint, and how long it held us up
            record = {
                **record,
                "checkpoint_seconds": done["checkpoint_seconds"],
                "checkpoint_wait_seconds": done["checkpoint_wait_seconds"],
            }
        checkpoint.append_metrics(self.run_dir, record)
        self.scalars.log_round(record)
        self.result.metrics.append(record)
        self.result.last_round = record["round"]


@dataclass
class RoundRunner:
    """What every round of a run needs, and the steps of one round (see `run_rounds`)."""

    cfg: ExperimentConfig
    run_dir: Path
    pool: WorkerPool
    commits: Commits
    sample_counts: list[int]
    adapter_config: Any
    """The first worker's reply to `adapter_config` (an ObjectRef of adapter_config.json's
    content), which every aggregator of the run gets."""
    provenance: dict[str, str]
    train_settings: TrainSettings
    shards: ShardBuilder
    policy: FailurePolicy
    probabilities: list[float] | None = None
    """Per-client availability (selection `availability`)."""
    ranks: list[int | None] | None = None
    """Per-client LoRA rank from the profile (None: the global rank)."""
    system: SystemModel | None = None
    probe: HeldoutProbe | None = None
    """Held-out exact match after each round (`eval.probe_per_category`)."""
    log: Log = _print
    show_progress: bool = False
    adapter_bytes: int = 0
    reported_at: list[float] = field(default_factory=list)
    """When each round of this process was reported (for the round line's ETA)."""

    # --- the aggregator -------------------------------------------------------------------

    def new_aggregator(
        self, last_round: int, state: checkpoint.RoundCheckpoint | None
    ) -> tuple[Any, Any]:
        """A fresh aggregator holding the global adapter after `last_round` (from `state`, the
        checkpoint on disk, or the seed's initial adapter for round 0)."""
        # Pinned to the driver's node: checkpoints land in the run directory the driver sees,
        # even when the other nodes share no filesystem with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        aggregator = AggregatorActor.options(scheduling_strategy=here, **forwarded_env()).remote(
            str(self.run_dir.resolve()), self.cfg, [self.adapter_config], self.provenance
        )
        round_dir = state.path if state is not None else None
        if round_dir is None and last_round > 0:
            round_dir = self.run_dir / checkpoint.ROUNDS_DIR / checkpoint.round_name(last_round)
        if round_dir is not None:  # the aggregator reads the tensors; the driver never holds them
            global_ref = aggregator.restore.remote(str(round_dir))
        else:
            global_ref = self.pool.first().initial_adapter.remote()
            _aggregator_call(aggregator.set_global.remote(global_ref))
        self.adapter_bytes = _aggregator_call(aggregator.global_nbytes.remote())
        return aggregator, global_ref

    def replace_aggregator(self, lost: Any, round_idx: int, err: Exception) -> tuple[Any, Any, int]:
        """A fresh aggregator from the newest intact round on disk, and the round to go on with."""
        with contextlib.suppress(Exception):  # it may be gone already
            ray.kill(lost, no_restart=True)
        state = checkpoint.find_resume_point(self.run_dir, self.log)
        last = state.round_idx if state else 0
        self.commits.lost_after(last)
        self.log(
            f"round {round_idx}: the aggregator failed ({err}); redoing the round"
            f"{'s' if round_idx > last + 1 else ''} from round {last + 1} on, after the last "
            f"checkpoint on disk (round {last})"
        )
        aggregator, global_ref = self.new_aggregator(last, state)
        return aggregator, global_ref, last + 1

    def flush_quietly(self, aggregator: Any) -> None:
        with contextlib.suppress(Exception):
            ref = aggregator.flush.remote()
            ready, _ = ray.wait([ref], timeout=INTERRUPT_FLUSH_S)
            if ready:
                self.commits.written(ray.get(ref))

    # --- the steps of a round ---------------------------------------------------------------

    def select(self, round_idx: int) -> Selection:
        """The clients selected for `round_idx` (a function of the seed and the round)."""
        cfg = self.cfg
        if cfg.server.client_ids is not None:  # fixed clients, e.g. a local-only baseline
            return Selection(sorted(cfg.server.client_ids), "client_ids")
        return select_round(
            cfg.server.selection,
            cfg.run.seed,
            round_idx,
            cfg.data.num_clients,
            clients_per_round(cfg),
            self.probabilities,
        )

    def plan(self, round_idx: int, selected: list[int]) -> tuple[list[int], RoundPlan | None]:
        """The clients that will report: all of `selected`, or with the system model those that
        neither drop out nor miss the deadline (inviting more for `server.min_updates`)."""
        if self.system is None:
            return selected, None
        cfg = self.cfg
        plan = self.system.plan_round(
            round_idx,
            selected,
            lambda c: self.train_settings.num_steps(self.sample_counts[c]),
            self.adapter_bytes,
            over_selection(cfg.run.seed, round_idx, cfg.data.num_clients, selected),
            cfg.server.min_updates or 0,
        )
        return plan.kept, plan

    def shard_tasks(self, round_idx: int, clients: list[int]) -> list[ClientTask]:
        """The round's tasks, their shard blocks built (and the next round's prefetched)."""
        by_ref = self.cfg.cluster.data_transport == "object_store"
        self.shards.ensure(clients)  # built now, unless the previous round prefetched them
        if by_ref:  # the object store holds the blocks of this round's clients only
            self.shards.keep_refs(clients)
        if round_idx < self.cfg.run.rounds:  # selection is seeded: tokenise the next round's now
            self.shards.prefetch(self.select(round_idx + 1).clients)
        seed = self.cfg.run.seed
        return [
            ClientTask(
                round_idx,
                c,
                client_seed(seed, round_idx, c),
                shard_ref=self.shards.object_ref(c) if by_ref else None,
            )
            for c in clients
        ]

    def train(
        self, round_idx: int, tasks: list[ClientTask], aggregator: Any, global_ref: Any
    ) -> list[ClientOutcome]:
        """Train the tasks on the pool, streaming each worker's batch of updates straight into
        the aggregator; returns every client's outcome once all updates are folded in."""
        clients = [t.client_id for t in tasks]
        _aggregator_call(
            aggregator.begin_round.remote({c: self.sample_counts[c] for c in clients}, round_idx)
        )
        # what each client's training needs from the strategy (FedProx mu, SCAFFOLD correction),
        # asked for before any update is folded in
        contexts = client_contexts(aggregator, clients, self.ranks)
        folds: list[Any] = []

        def fold(succeeded: list[ClientTask], uploads_ref: Any) -> None:
            ids = [task.client_id for task in succeeded]
            folds.append(aggregator.fold_batch.remote(ids, uploads_ref))

        try:
            outcomes = self.pool.run(
                tasks, global_ref, fold, self.policy, self.log, self.show_progress, contexts
            )
        except TaskInputLost as err:  # the clients' contexts and adapter come from the aggregator
            raise AggregatorLost(str(err)) from None
        for ref in folds:
            _aggregator_call(ref)
        return outcomes

    def measure(
        self,
        round_idx: int,
        outcomes: list[ClientOutcome],
        started: float,
        plan: RoundPlan | None,
    ) -> TrainedRound:
        ran = [o.peak_rss_mb for o in outcomes if o.peak_rss_mb > 0]
        resources = {  # see fedsim/resources.py
            "driver_peak_rss_mb": peak_rss_mb(),
            "worker_peak_rss_mb": max(ran) if ran else None,
            "object_store_bytes": round_object_store_bytes(
                self.adapter_bytes * len(outcomes),
                sum(o.upload_bytes for o in outcomes),
                sum(o.context_bytes for o in outcomes),
            ),
        }
        simulated = plan.simulated_seconds if plan is not None else None
        seconds = time.perf_counter() - started
        return TrainedRound.measure(round_idx, outcomes, seconds, resources, simulated)

    def details(
        self, outcomes: list[ClientOutcome], selection: Selection, plan: RoundPlan | None
    ) -> dict[str, Any]:
        """round.json's account of the round beyond its record."""
        details = {
            "client_results": [_client_info(o) for o in outcomes],
            "bytes_downlink": self.adapter_bytes * len(outcomes),
            "selection": selection.record(),
        }
        if plan is not None:
            details["system"] = plan.to_json()
        return details

    def finish(
        self, aggregator: Any, trained: TrainedRound, details: dict[str, Any]
    ) -> tuple[dict[str, Any], Any]:
        """Apply the strategy and start the checkpoint; (the aggregator's summary, whose
        `record` is the round's record, and the new global adapter's reference)."""
        summary_ref, global_ref = aggregator.finish_round.options(num_returns=2).remote(
            trained.round, details, trained
        )
        return _aggregator_call(summary_ref), global_ref

    def probe_round(self, round_idx: int, global_ref: Any) -> dict[str, Any]:
        """The held-out probe's fields for the round's new global adapter ({} when off). A
        probe that cannot run costs the round line its figure, never the run."""
        if self.probe is None:
            return {}
        prompts, limit = list(self.probe.prompts), self.probe.max_new_tokens
        try:
            answers = ray.get(self.pool.first().generate.remote(global_ref, prompts, limit))
        except ray.exceptions.RayError as err:
            self.log(f"round {round_idx}: held-out probe skipped ({type(err).__name__})")
            return {}
        return self.probe.score(answers)

    def report(self, record: dict[str, Any], outcomes: list[ClientOutcome]) -> None:
        for o in outcomes:
            if o.error:
                self.log(f"client {o.client_id} failed in round {record['round']}:\n"
                         f"{o.error.rstrip()}")  # fmt: skip
        self.reported_at.append(time.perf_counter())
        line = _round_line(record, self.cfg.run.rounds, outcomes)
        self.log(line + _eta(self.reported_at, record, self.cfg.run.rounds))


def client_contexts(
    aggregator: Any, clients: list[int], ranks: list[int | None] | None
) -> dict[int, Any]:
    """Client id -> the reference of its `ClientContext` for `clients`, from one aggregator call
    with a return value per client (so a worker fetches only its own clients' contexts)."""
    if not clients:
        return {}
    own = [ranks[c] for c in clients] if ranks else None
    if len(clients) == 1:  # a call of one return value returns the value, not a list of one
        return {clients[0]: aggregator.client_context.remote(clients[0], own[0] if own else None)}
    refs = aggregator.client_contexts.options(num_returns=len(clients)).remote(clients, own)
    return dict(zip(clients, refs, strict=True))


def _system_model(
    cfg: ExperimentConfig, profiles: list[ClientProfile] | None
) -> SystemModel | None:
    """The simulated system of `cfg.system`, or None when it is off."""
    if not cfg.system.enabled:
        return None
    return SystemModel(cfg.system, cfg.run.seed, profiles)


def _client_info(o: ClientOutcome) -> dict[str, Any]:
    info: dict[str, Any] = {
        "client": o.client_id,
        "ok": o.ok,
        "samples": o.num_samples,
        "mean_loss": o.mean_loss,
        "losses": [round(x, 6) for x in o.losses],
        "train_seconds": round(o.train_seconds, 4),
        "worker": o.worker,
        "node": o.node,
        "attempts": o.attempts,
    }
    if o.error:
        info["error"] = o.error
    return info


def _eta(reported_at: list[float], record: dict[str, Any], rounds: int) -> str:
    """` | eta 2 min 5 s` for the rounds left, at the pace of the last (up to) 5 rounds of this
    process (the first round's own time until there are two); empty after the last round."""
    left = rounds - record["round"]
    if left <= 0:
        return ""
    recent = reported_at[-6:]
    pace = (recent[-1] - recent[0]) / (len(recent) - 1) if len(recent) > 1 else record["seconds"]
    seconds = round(pace * left)
    return (
        f" | eta {seconds // 60} min {seconds % 60} s" if seconds >= 60 else f" | eta {seconds} s"
    )


def _round_line(record: dict[str, Any], rounds: int, outcomes: list[ClientOutcome]) -> str:
    line = (
        f"round {record['round']:>3}/{rounds} | clients {record['num_clients']} | "
        f"samples {record['samples']} | train loss {record['train_loss']:.4f} | "
        f"{record['seconds']:.1f} s"
    )
    if "heldout_exact_match" in record:
        line += f" | held-out exact match {record['heldout_exact_match']:.2f}"
    failed = [o for o in outcomes if not o.ok]
    if failed:
        first = failed[0].error.strip().splitlines()[-1] if failed[0].error else "?"
        line += f" | {len(failed)} failed (client {failed[0].client_id}: {first})"
    for client, why in sorted(record.get("rejected", {}).items()):
        line += f" | rejected client {client}: {why}"
    if record.get("kept_previous_adapter"):
        line += " | no update applied: kept the previous adapter"
    if "epsilon" in record:
        line += f" | epsilon {record['epsilon']:.3f}"
    return line
