"""Phases 1 and 2 of a run: prepare (check every input, write nothing) and materialise (write
the run directory's config, partition and shard index).

Everything that can be wrong with the input surfaces in `prepare_run`, as a FedsimInputError,
before Ray starts or the run directory is touched.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray

from fedsim import checkpoint, ray_auth, rundir
from fedsim.config import ExperimentConfig
from fedsim.data.pipeline import PreparedData, prepare_data, write_partition
from fedsim.data.profiles import ClientProfile, load_profiles
from fedsim.data.shard_builder import ShardBuilder
from fedsim.data.shards import INDEX_FILE, ShardIndex, remove_blocks, write_index
from fedsim.data.synthetic import generic_text
from fedsim.data.templates import get_template, template_text
from fedsim.errors import FedsimInputError
from fedsim.execution import cluster_address
from fedsim.model_files import (
    TinyModelSpec,
    check_model,
    ensure_tiny_model,
    load_tokenizer,
    resolve_model_path,
)
from fedsim.seeds import STREAMS_VERSION
from fedsim.server.client_state import ClientStateStore
from fedsim.server.selection import draw_probabilities

Log = Callable[[str], None]
TINY_CORPUS_LINES = 4000


def _print(message: str) -> None:
    print(message, flush=True)


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
        rundir.check_overwritable(run_dir)
    resume_from = None
    if resume:
        if not run_dir.is_dir():
            raise FedsimInputError(f"--resume: run directory {run_dir} does not exist")
        resume_from = checkpoint.find_resume_point(run_dir, log)
        if resume_from is None:
            raise FedsimInputError(f"--resume: {run_dir} has no intact round to resume from")
        _check_streams(resume_from)
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
    check_model(model_path, cfg.model.lora)
    return PreparedRun(cfg, run_dir, data, model_path, resume_from, profiles)


def _check_streams(state: checkpoint.RoundCheckpoint) -> None:
    """A run written under other random streams would not continue as it began: refuse it."""
    written = state.info.get("random_streams", 1)  # runs before the version was recorded: 1
    if written != STREAMS_VERSION:
        raise FedsimInputError(
            f"--resume: {state.path} was written by a fedsim whose random streams (version "
            f"{written}) differ from this one's (version {STREAMS_VERSION}), so its rounds cannot "
            "be continued as they began; finish it with the fedsim that started it, or start "
            "again with --overwrite"
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
    replaced = rundir.move_aside(run_dir) if overwrite and run_dir.exists() else None
    rundir.make_dir(run_dir)
    if not rundir.is_fedsim_dir(run_dir):  # new, or written before fedsim marked its folders
        rundir.mark_run_dir(run_dir)
    first_round = prep.resume_from.round_idx + 1 if prep.resume_from else 1
    rundir.record_config(run_dir, cfg.to_yaml(), first_round)
    write_partition(run_dir / "partition.json", data)
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
