"""The round loop on Ray: prepare the run, start the worker pool and the aggregator, run rounds.

`run_experiment` reads top to bottom in three phases:

1. prepare — everything that can fail on bad input (config, run directory, data, model path)
   fails here, before the run directory is touched;
2. materialise — write config.yaml, partition.json and the tokenised shards;
3. rounds — on Ray: select clients, broadcast the global adapter once, let free workers take the
   next client, stream updates into the aggregator, checkpoint, log one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedsim import checkpoint, ray_auth, rundir
from fedsim.client.profile import ClientProfile, load_profiles
from fedsim.client.trainer import TrainSettings
from fedsim.client.worker import ClientOutcome, ClientTask, WorkerSpec
from fedsim.config import ExperimentConfig, clients_per_round
from fedsim.data.pipeline import PreparedData, prepare_data, write_partition
from fedsim.data.shard_builder import ShardBuilder
from fedsim.data.shards import INDEX_FILE, ShardIndex, remove_blocks, write_index
from fedsim.data.synthetic import generic_text
from fedsim.data.templates import get_template, template_text
from fedsim.errors import FedsimInputError
from fedsim.execution import (  # WORKER_ENV re-exported for scripts
    WORKER_ENV,  # noqa: F401
    FailurePolicy,
    WorkerPool,
    cluster_address,
    ray_session,
    worker_pool,
)
from fedsim.faults import forwarded_env
from fedsim.model import (
    LoraSpec,
    TinyModelSpec,
    check_model,
    ensure_tiny_model,
    load_tokenizer,
    resolve_model_path,
)
from fedsim.resources import peak_rss_mb, round_object_store_bytes
from fedsim.server.aggregator import AggregatorActor, adapter_nbytes
from fedsim.server.client_state import ClientStateStore
from fedsim.server.selection import (
    Selection,
    client_seed,
    draw_probabilities,
    over_selection,
    select_round,
)
from fedsim.server.system_model import SystemModel
from fedsim.tb import train_log

Log = Callable[[str], None]
TINY_CORPUS_LINES = 4000
MAX_ROUND_ATTEMPTS = 3
"""How often a round is redone after its aggregator died before the run gives up."""
CONFIGS_DIR = "configs"
"""Every config a run has used, as `round_NNNN.yaml` (the first round it applied to)."""
INTERRUPT_FLUSH_S = 5.0
"""On Ctrl-C, how long to wait for the checkpoint being written in the background."""


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass
class RunResult:
    """What `run_experiment` did: the run directory and the rounds it completed."""

    run_dir: Path
    first_round: int
    last_round: int
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PreparedRun:
    cfg: ExperimentConfig
    run_dir: Path
    data: PreparedData
    model_path: str
    resume_from: checkpoint.RoundCheckpoint | None
    profiles: list[ClientProfile] | None = None


# ------------------------------------------------------------------------------------------
# Phase 1: prepare (no writes to the run directory)
# ------------------------------------------------------------------------------------------


def prepare_model(cfg: ExperimentConfig, log: Log = _print) -> str:
    """Path of the base model: the cached built-in tiny model, or the user's model path/hub id."""
    if cfg.model.name_or_path != "tiny":
        return resolve_model_path(cfg.model.name_or_path)
    spec = TinyModelSpec(**dataclasses.asdict(cfg.model.tiny))
    # A real base model has seen prompt boilerplate like Alpaca's; so has the tiny one.
    corpus = generic_text(TINY_CORPUS_LINES, seed=0) + template_text() * 50
    return str(ensure_tiny_model(spec, corpus, log=log))


def prepare_run(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    log: Log = _print,
) -> PreparedRun:
    """Check everything that can be wrong with the input; raises FedsimInputError."""
    run_dir = cfg.run_dir
    if resume and overwrite:
        raise FedsimInputError("--resume and --overwrite: choose one")
    problem = rundir.location_problem(cfg.run.output_dir, cfg.run.name)
    if problem:
        raise FedsimInputError(problem)
    if run_dir.exists() and not (resume or overwrite):
        raise FedsimInputError(
            f"run directory {run_dir} already exists; pass --resume to continue it "
            "or --overwrite to replace it"
        )
    if overwrite and run_dir.exists():
        _check_overwritable(run_dir)
    resume_from = None
    if resume:
        if not run_dir.is_dir():
            raise FedsimInputError(f"--resume: run directory {run_dir} does not exist")
        resume_from = checkpoint.find_resume_point(run_dir, log)
        if resume_from is None:
            raise FedsimInputError(f"--resume: {run_dir} has no intact round to resume from")
        if resume_from.info.get("config_hash") != cfg.training_hash() and not allow_config_change:
            raise FedsimInputError(
                f"--resume: the config differs from the one that wrote {resume_from.path} "
                f"(see {run_dir / 'config.yaml'}); only run.rounds, cluster and eval may change "
                "unless --allow-config-change is given"
            )
    data = prepare_data(cfg.data, cfg.run.seed)
    if resume_from and resume_from.info.get("partition_hash") != data.partition_hash():
        raise FedsimInputError(
            f"--resume: the data or its partition differs from the one that wrote "
            f"{resume_from.path}; refusing to mix them"
        )
    if resume_from:
        ClientStateStore(run_dir).check_resumable(resume_from.round_idx)
    profiles = None
    if cfg.client.profile:
        profiles = load_profiles(cfg.client.profile, cfg.data.num_clients, cfg.model.lora.r)
        low = [i for i, p in enumerate(profiles) if p.lora_rank and p.lora_rank < cfg.model.lora.r]
        if low and cfg.server.strategy == "scaffold":
            raise FedsimInputError(
                f"client.profile: clients {low[:3]} train LoRA rank below model.lora.r; "
                "scaffold's control variates need every client at the global rank"
            )
    address = cluster_address(cfg.cluster)
    if address and not ray.is_initialized():
        ray_auth.check_cluster(address, cfg.cluster.allow_unauthenticated)
    model_path = prepare_model(cfg, log)
    lora = cfg.model.lora
    check_model(model_path, LoraSpec(lora.r, lora.alpha, lora.dropout, tuple(lora.target_modules)))
    return PreparedRun(cfg, run_dir, data, model_path, resume_from, profiles)


def _check_overwritable(run_dir: Path) -> None:
    """--overwrite deletes only an empty folder or one that fedsim made (its marker file)."""
    if not run_dir.is_dir() or run_dir.is_symlink():
        raise FedsimInputError(f"--overwrite: {run_dir} is not a directory; refusing to replace it")
    if any(run_dir.iterdir()) and not rundir.is_fedsim_dir(run_dir):
        raise FedsimInputError(
            f"--overwrite: {run_dir} was not created by fedsim (it has no {rundir.RUN_MARKER} "
            "marker); refusing to delete it: remove it yourself or choose another run.name"
        )


def availability_probabilities(
    cfg: ExperimentConfig, profiles: list[ClientProfile] | None
) -> list[float]:
    """Each client's availability: its profile's, else drawn from `server.availability`."""
    a = cfg.server.availability
    drawn = draw_probabilities(
        a.distribution, cfg.data.num_clients, cfg.run.seed, a.value, a.low, a.high, a.a, a.b
    )
    if profiles is None:
        return drawn
    return [
        p.availability if p.availability is not None else d
        for p, d in zip(profiles, drawn, strict=True)
    ]


def selection_size(cfg: ExperimentConfig) -> int:
    """Most clients a round can have: `client_ids`, every client for `all`, else
    clients_per_round."""
    if cfg.server.client_ids is not None:
        return len(cfg.server.client_ids)
    return cfg.data.num_clients if cfg.server.selection == "all" else clients_per_round(cfg)


# ------------------------------------------------------------------------------------------
# Phase 2: materialise the run directory
# ------------------------------------------------------------------------------------------


def _shards_key(cfg: ExperimentConfig, data: PreparedData, model_path: str) -> str:
    d = cfg.data
    return json.dumps(
        [data.partition_hash(), model_path, d.template, d.cutoff_len, d.train_on_inputs, "blocks"]
    )


def materialise(prep: PreparedRun, overwrite: bool, log: Log = _print) -> Path:
    """Write config.yaml, partition.json and the shard index; the shard blocks are tokenised
    when rounds need them (`shard_builder`), and kept while the shards key is unchanged."""
    cfg, run_dir, data = prep.cfg, prep.run_dir, prep.data
    replaced = _move_aside(run_dir) if overwrite and run_dir.exists() else None
    rundir.make_dir(run_dir)
    if not rundir.is_fedsim_dir(run_dir):  # new, or written before fedsim marked its folders
        rundir.mark_run_dir(run_dir)
    first_round = prep.resume_from.round_idx + 1 if prep.resume_from else 1
    record_config(run_dir, cfg.to_yaml(), first_round)
    write_partition(run_dir / "partition.json", data.summary())
    if replaced is not None:  # the new run directory exists: only now is the old one deleted
        shutil.rmtree(replaced)

    shards_dir = run_dir / "shards"
    key = _shards_key(cfg, data, prep.model_path)
    manifest = shards_dir / "manifest.json"
    if manifest.exists() and manifest.read_text() == key and (shards_dir / INDEX_FILE).is_file():
        return shards_dir  # its block files are still valid: reused, never re-tokenised
    # Other data or tokenisation: drop the old blocks (and the old one-file layout), then write
    # the index, known from the partition sizes alone, and the manifest that vouches for blocks.
    manifest.unlink(missing_ok=True)
    shards_dir.mkdir(exist_ok=True)
    remove_blocks(shards_dir)
    (shards_dir / "train.arrow").unlink(missing_ok=True)
    index = ShardIndex.from_sizes([len(c) for c in data.clients])
    write_index(shards_dir, index)
    rundir.write_text_atomic(manifest, key)
    log(
        f"shards: {index.num_blocks} blocks of {index.block_size} clients in {shards_dir}, "
        "tokenised as the rounds need them"
    )
    return shards_dir


def _move_aside(run_dir: Path) -> Path:
    """Rename the run directory that --overwrite replaces to a hidden sibling (deleted once the
    new one exists), so that a crash in between leaves it whole rather than half deleted."""
    aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
    os.rename(run_dir, aside)
    rundir.fsync_dir(run_dir.parent)
    return aside


def record_config(run_dir: Path, text: str, first_round: int) -> None:
    """Write config.yaml, keeping every config the run has used in `configs/round_NNNN.yaml`,
    named by the first round it applied to. Configs of rounds about to be redone are dropped."""
    history = rundir.make_dir(run_dir / CONFIGS_DIR)
    current = run_dir / "config.yaml"
    if current.is_file() and not any(history.iterdir()):  # a run from before the history
        rundir.write_bytes_atomic(history / checkpoint.config_name(1), current.read_bytes())
    kept = []
    for path in sorted(history.glob("round_*.yaml")):
        if int(path.stem[6:]) >= first_round:
            path.unlink()
        else:
            kept.append(path)
    if not kept or kept[-1].read_text() != text:
        rundir.write_text_atomic(history / checkpoint.config_name(first_round), text)
    rundir.write_text_atomic(current, text)


def shard_builder(prep: PreparedRun, shards_dir: Path, log: Log = _print) -> ShardBuilder:
    """The builder of `shards_dir`'s blocks (after `materialise`); close it when done."""
    d = prep.cfg.data
    return ShardBuilder(
        shards_dir,
        prep.data.table,
        prep.data.clients,
        load_tokenizer(prep.model_path),
        get_template(d.template),
        d.cutoff_len,
        d.train_on_inputs,
        log,
    )


def build_shards(
    prep: PreparedRun, shards_dir: Path, clients: list[int] | None = None, log: Log = _print
) -> None:
    """Build the blocks of `clients` (all clients by default) now, for code that reads the
    shards outside `run_experiment` (benchmarks, worker tests)."""
    with shard_builder(prep, shards_dir, log) as builder:
        builder.ensure(range(builder.index.num_clients) if clients is None else clients)


# ------------------------------------------------------------------------------------------
# Phase 3: Ray
# ------------------------------------------------------------------------------------------


def worker_spec(
    cfg: ExperimentConfig, model_path: str, shards_dir: Path, pad_id: int
) -> WorkerSpec:
    c, lora = cfg.client, cfg.model.lora
    return WorkerSpec(
        model_path=model_path,
        model_name=cfg.model.name_or_path if cfg.model.name_or_path != "tiny" else model_path,
        dtype=cfg.model.dtype,
        lora=LoraSpec(lora.r, lora.alpha, lora.dropout, tuple(lora.target_modules)),
        seed=cfg.run.seed,
        shards_dir=str(shards_dir.resolve()),
        backend=c.backend,
        settings=TrainSettings(c, pad_token_id=pad_id),
        num_threads=max(1, int(cfg.cluster.cpus_per_worker)),
        device="cuda" if cfg.cluster.gpus_per_worker > 0 else "cpu",
        quantization=cfg.model.quantization,
        compression=c.compression,
    )


def _round_record(
    round_idx: int, outcomes: list[ClientOutcome], seconds: float, adapter_bytes: int = 0
) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    samples = sum(o.num_samples for o in ok)
    loss = sum(o.mean_loss * o.num_samples for o in ok) / samples if samples else float("nan")
    # each client's first step runs at the incoming global weights: its loss scores the previous
    # round's global adapter on that client's data, before any local update
    first = [(o.losses[0], o.num_samples) for o in ok if o.losses]
    weight = sum(n for _, n in first)
    global_loss = sum(x * n for x, n in first) / weight if weight else float("nan")
    return {
        "round": round_idx,
        "clients": [o.client_id for o in outcomes],
        "num_clients": len(outcomes),
        "num_failed": len(outcomes) - len(ok),
        "samples": samples,
        "train_loss": loss,
        "global_loss": global_loss,
        "seconds": round(seconds, 3),
        **_resource_record(outcomes, adapter_bytes),
    }


def _resource_record(outcomes: list[ClientOutcome], adapter_bytes: int) -> dict[str, Any]:
    """The round's resource figures (see fedsim/resources.py): peak RSS of the driver and of the
    busiest worker (MiB, process lifetime so far), and the bytes moved through the object store,
    with the global adapter counted once per dispatched task."""
    ran = [o.peak_rss_mb for o in outcomes if o.peak_rss_mb > 0]
    return {
        "driver_peak_rss_mb": peak_rss_mb(),
        "worker_peak_rss_mb": max(ran) if ran else None,
        "object_store_bytes": round_object_store_bytes(
            adapter_bytes * len(outcomes),
            sum(o.upload_bytes for o in outcomes),
            sum(o.context_bytes for o in outcomes),
        ),
    }


def run_experiment(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    log: Log = _print,
    show_progress: bool = True,
) -> RunResult:
    """Run (or resume) the experiment described by `cfg`; see the module docstring."""
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
    per_round = selection_size(cfg)
    if prep.resume_from:  # finish a client-state commit that a crash cut short
        ClientStateStore(prep.run_dir).settle(prep.resume_from.round_idx)

    # --- 3. rounds on Ray ---
    options: dict[str, Any] = {
        "num_cpus": cfg.cluster.cpus_per_worker,
        "num_gpus": cfg.cluster.gpus_per_worker,
    }
    options.update(forwarded_env())  # failure tests inject faults into the workers
    with (
        ray_session(cfg.cluster),
        worker_pool(cfg, spec, per_round, options, log) as pool,
        shard_builder(prep, shards_dir, log) as shards,
    ):
        n_workers = len(pool.actors)
        ctx = _RoundContext(
            cfg=cfg,
            run_dir=prep.run_dir,
            pool=pool,
            policy=FailurePolicy(cfg.cluster.max_client_retries),
            sample_counts=[len(c) for c in prep.data.clients],
            adapter_config=ray.get(pool.first().adapter_config.remote()),
            provenance={
                "config_hash": cfg.training_hash(),
                "partition_hash": prep.data.partition_hash(),
            },
            log=log,
            show_progress=show_progress,
            probabilities=availability_probabilities(cfg, prep.profiles),
            ranks=[p.lora_rank for p in prep.profiles] if prep.profiles else None,
            system=_system_model(cfg, prep.profiles),
            train_settings=spec.settings,
            shards=shards,
            shard_refs=cfg.cluster.data_transport == "object_store",
        )
        aggregator, global_ref = ctx.new_aggregator(start_round - 1, prep.resume_from)
        ctx.adapter_bytes = adapter_nbytes(ray.get(global_ref))
        log(
            f"run {prep.run_dir}: {cfg.data.num_clients} clients, {per_round} per round, "
            f"{n_workers} workers, rounds {start_round}..{cfg.run.rounds}"
        )
        rounds = _RoundLoop(ctx, result, train_log(prep.run_dir))  # TensorBoard, if installed
        try:
            rounds.run(start_round, cfg.run.rounds, aggregator, global_ref)
        finally:
            rounds.scalars.close()
    return result


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


@dataclass
class _RoundContext:
    """What every round of a run needs; `run_round` is one round, top to bottom."""

    cfg: ExperimentConfig
    run_dir: Path
    pool: WorkerPool
    policy: FailurePolicy
    sample_counts: list[int]
    adapter_config: dict[str, Any]
    provenance: dict[str, str]
    log: Log
    show_progress: bool
    adapter_bytes: int = 0
    probabilities: list[float] | None = None
    """Per-client availability (selection `availability`)."""
    ranks: list[int | None] | None = None
    """Per-client LoRA rank from the profile (None: the global rank)."""
    system: SystemModel | None = None
    train_settings: TrainSettings | None = None
    shards: ShardBuilder | None = None
    """Builds the shard blocks a round needs (None: they are all on disk already)."""
    shard_refs: bool = False
    """Hand each task its shard block through the object store (cluster.data_transport)."""

    def new_aggregator(
        self, last_round: int, state: checkpoint.RoundCheckpoint | None
    ) -> tuple[Any, Any]:
        """A fresh aggregator holding the global adapter after `last_round` (from `state`, the
        checkpoint on disk, or the seed's initial adapter for round 0)."""
        # Pinned to the driver's node: checkpoints land in the run directory the driver sees,
        # even when the other nodes share no filesystem with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        aggregator = AggregatorActor.options(scheduling_strategy=here, **forwarded_env()).remote(
            str(self.run_dir.resolve()), self.cfg, self.adapter_config, self.provenance
        )
        if state is None and last_round > 0:
            path = self.run_dir / checkpoint.ROUNDS_DIR / checkpoint.round_name(last_round)
            state = checkpoint.load_round(path)
        if state is not None:
            global_ref = ray.put(state.adapter)
            _aggregator_call(aggregator.set_global.remote(global_ref, state.server_state))
        else:
            global_ref = self.pool.first().initial_adapter.remote()
            _aggregator_call(aggregator.set_global.remote(global_ref))
        return aggregator, global_ref

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
            selection_size(cfg),
            self.probabilities,
        )

    def run_round(
        self, round_idx: int, aggregator: Any, global_ref: Any
    ) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
        """Select, train and aggregate one round, and start its checkpoint; returns its record,
        the new global adapter's reference, and the checkpoints that landed meanwhile."""
        cfg, start = self.cfg, time.perf_counter()
        # --- select ---
        selection = self.select(round_idx)
        selected = selection.clients
        plan = None
        if self.system is not None:  # simulated dropouts and stragglers do not train
            plan = self.system.plan_round(
                round_idx,
                selected,
                lambda c: self.train_settings.num_steps(self.sample_counts[c]),
                self.adapter_bytes,
                over_selection(cfg.run.seed, round_idx, cfg.data.num_clients, selected),
                cfg.server.min_updates or 0,
            )
            selected = plan.kept
        if self.shards is not None:
            self.shards.ensure(selected)  # built now, unless the previous round prefetched them
            if self.shard_refs:  # the object store holds the blocks of this round's clients only
                self.shards.keep_refs(selected)
            if round_idx < cfg.run.rounds:  # selection is seeded: tokenise the next round's now
                self.shards.prefetch(self.select(round_idx + 1).clients)
        tasks = [
            ClientTask(
                round_idx,
                c,
                client_seed(cfg.run.seed, round_idx, c),
                shard_ref=self.shards.object_ref(c) if self.shards and self.shard_refs else None,
            )
            for c in selected
        ]
        _aggregator_call(
            aggregator.begin_round.remote({c: self.sample_counts[c] for c in selected}, round_idx)
        )
        # what each client's training needs from the strategy (FedProx mu, SCAFFOLD correction)
        contexts = {
            c: aggregator.client_context.remote(c, self.ranks[c] if self.ranks else None)
            for c in selected
        }
        # --- train, streaming each update straight from its worker into the aggregator ---
        folds: list[Any] = []
        outcomes = self.pool.run(
            tasks,
            global_ref,
            lambda task, adapter_ref: folds.append(
                aggregator.fold.remote(task.client_id, adapter_ref)
            ),
            self.policy,
            self.log,
            self.show_progress,
            contexts,
        )
        for fold in folds:
            _aggregator_call(fold)
        # --- aggregate and checkpoint ---
        record = _round_record(round_idx, outcomes, time.perf_counter() - start, self.adapter_bytes)
        if plan is not None:  # simulated wall-clock next to the real `seconds`
            record["simulated_seconds"] = round(plan.simulated_seconds, 6)
        info = {
            **record,
            "client_results": [_client_info(o) for o in outcomes],
            "bytes_downlink": self.adapter_bytes * len(tasks),
            "selection": selection.record(),
        }
        if plan is not None:
            info["system"] = plan.to_json()
        summary_ref, new_global_ref = aggregator.finish_round.options(num_returns=2).remote(
            round_idx, info
        )
        summary = _aggregator_call(summary_ref)
        # --- report ---
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["rejected"] = summary["aggregation"]["rejected"]
        record["uplink_bytes"] = summary["bytes"]["uplink"]
        if summary["aggregation"]["kept_previous_adapter"]:
            record["kept_previous_adapter"] = True
        if "dp" in summary:
            record["epsilon"] = summary["dp"]["epsilon"]
        record["aggregator_peak_rss_mb"] = summary.get("aggregator_peak_rss_mb")
        for o in outcomes:
            if o.error:
                self.log(f"client {o.client_id} failed in round {round_idx}:\n{o.error.rstrip()}")
        self.log(_round_line(record, cfg.run.rounds, outcomes))
        return record, new_global_ref, summary["checkpoints_written"]


class _RoundLoop:
    """Rounds start..end, with the checkpoint bookkeeping: a round's metrics line is appended only
    once the aggregator reports its checkpoint on disk (written in the background while the next
    round trains), and an aggregator that dies is replaced from the newest round on disk, redoing
    every round after it."""

    def __init__(self, ctx: _RoundContext, result: RunResult, scalars: Any) -> None:
        self.ctx, self.result, self.scalars = ctx, result, scalars
        self.unwritten: dict[int, dict[str, Any]] = {}
        """Records of trained rounds whose checkpoints are not yet known to be on disk."""

    def run(self, start: int, end: int, aggregator: Any, global_ref: Any) -> None:
        round_idx, failures = start, 0
        try:
            while True:
                try:
                    if round_idx > end:  # the last checkpoint still being written
                        self._written(_aggregator_call(aggregator.flush.remote()))
                        return
                    record, global_ref, written = self.ctx.run_round(
                        round_idx, aggregator, global_ref
                    )
                except AggregatorLost as err:
                    failures += 1
                    if failures >= MAX_ROUND_ATTEMPTS:
                        raise RuntimeError(
                            f"round {round_idx}: the aggregator failed {failures} times"
                        ) from None
                    aggregator, global_ref, round_idx = self._replace(aggregator, round_idx, err)
                    continue
                failures = 0
                self.unwritten[round_idx] = record
                self._written(written)
                round_idx += 1
        except KeyboardInterrupt:
            self._flush_quietly(aggregator)  # keep the round already trained, if it lands quickly
            raise

    def _replace(self, lost: Any, round_idx: int, err: Exception) -> tuple[Any, Any, int]:
        """A fresh aggregator from the newest intact round on disk, and the round to go on with."""
        with contextlib.suppress(Exception):  # it may be gone already
            ray.kill(lost, no_restart=True)
        state = checkpoint.find_resume_point(self.ctx.run_dir, self.ctx.log)
        last = state.round_idx if state else 0
        for r in sorted(self.unwritten):  # written before the aggregator died, or lost with it
            record = self.unwritten.pop(r)
            if r <= last:
                self._commit(record, None)
        self.ctx.log(
            f"round {round_idx}: the aggregator failed ({err}); redoing the round"
            f"{'s' if round_idx > last + 1 else ''} from round {last + 1} on, after the last "
            f"checkpoint on disk (round {last})"
        )
        aggregator, global_ref = self.ctx.new_aggregator(last, state)
        return aggregator, global_ref, last + 1

    def _written(self, written: list[dict[str, Any]]) -> None:
        for done in written:
            self._commit(self.unwritten.pop(done["round"]), done)

    def _commit(self, record: dict[str, Any], done: dict[str, Any] | None) -> None:
        if done is not None:  # the cost of the round's checkpoint, and how long it held us up
            record["checkpoint_seconds"] = done["checkpoint_seconds"]
            record["checkpoint_wait_seconds"] = done["checkpoint_wait_seconds"]
        checkpoint.append_metrics(self.ctx.run_dir, record)
        self.scalars.add_all("train", _scalars(record), record["round"])
        self.scalars.flush()
        self.result.metrics.append(record)
        self.result.last_round = record["round"]

    def _flush_quietly(self, aggregator: Any) -> None:
        # interrupted anyway: whatever did not land, resume finds out from the disk
        with contextlib.suppress(Exception):
            self._written(ray.get(aggregator.flush.remote(), timeout=INTERRUPT_FLUSH_S))


def _system_model(
    cfg: ExperimentConfig, profiles: list[ClientProfile] | None
) -> SystemModel | None:
    """The simulated system of `cfg.system`, or None when it is off."""
    if not cfg.system.enabled:
        return None
    return SystemModel(cfg.system, cfg.run.seed, profiles)


def _scalars(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("train_loss", "samples", "num_clients", "num_failed", "seconds")
    return {k: record[k] for k in keys}


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


def _round_line(record: dict[str, Any], rounds: int, outcomes: list[ClientOutcome]) -> str:
    line = (
        f"round {record['round']:>3}/{rounds} | clients {record['num_clients']} | "
        f"samples {record['samples']} | train loss {record['train_loss']:.4f} | "
        f"{record['seconds']:.1f} s"
    )
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
