"""Experiment tracking: a run's numbers also go to TensorBoard, MLflow and Weights & Biases.

The run directory stays the record (metrics.jsonl, eval.jsonl, report/); a `Tracker` copies what
lands there to a tracking tool as it lands:

- `log_round(record)` — the trainer, once a round's checkpoint is on disk: every number of its
  metrics.jsonl line, as `train/<key>` at step = round;
- `log_eval(round, metrics)` — `fedsim eval` (and `--watch`), per scored question set:
  `eval/<set>/<metric>` at step = round;
- `log_artifacts(paths)` — `fedsim report`: the report's plots;
- `close()`.

One class per backend: `TensorBoardTracker` (when the tensorboard extra is installed; on by
default, as before), `MlflowTracker` (`tracking.mlflow.uri`) and `WandbTracker`
(`tracking.wandb.project`); `Trackers` is the composite that `train_tracker`, `eval_tracker` and
`log_report` build from the config. mlflow and wandb are imported only when configured.

The trainer, the evaluator and the report are separate processes that write to the same MLflow or
W&B run: its id is kept in RUN_DIR/tracking.json, so `fedsim eval`, `fedsim report` and
`fedsim run --resume` continue the run the first of them created. The trainer alone logs the
config (flattened to dotted keys) as the run's params.

Nothing from the environment is logged: no API key reaches a tracker (the judge's key is read
from the variable `eval.judge.api_key_env` names, and only the name is in the config), W&B's
console capture is off, and MLflow runs are created through `MlflowClient`, which adds no
context tags of its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from fedsim import rundir
from fedsim.config import ConfigError, ExperimentConfig, config_from_dict
from fedsim.errors import FedsimInputError
from fedsim.tb import TENSORBOARD_DIR, ScalarLog

TRACKING_FILE = "tracking.json"
"""RUN_DIR/tracking.json: the MLflow and W&B run ids of the run, so every process continues one."""
MLFLOW_PARAM_CHARS = 6000
"""Longest param value MLflow stores; longer values (a long list) are cut to this."""
MLFLOW_BATCH = 100
"""Params per MLflow log_batch request (the server's limit)."""

Numbers = dict[str, float]


# ------------------------------------------------------------------------------------------
# What gets logged
# ------------------------------------------------------------------------------------------


def numbers(values: Mapping[str, Any]) -> Numbers:
    """The finite numbers of `values` (no bools, strings, lists; not `round`, which is the step).
    NaN and infinities are dropped: MLflow rejects them and they plot as nothing anyway."""
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and key != "round"
        and math.isfinite(value)
    }


def round_metrics(record: Mapping[str, Any]) -> Numbers:
    """A metrics.jsonl line as `train/<key>` metrics, and the held-out probe's exact match per
    category (`eval.probe_per_category`) as `train/exact_match/<category>`."""
    out = {f"train/{key}": value for key, value in numbers(record).items()}
    by_category = numbers(record.get("exact_match_by_category") or {})
    out.update({f"train/exact_match/{c}": value for c, value in by_category.items()})
    return out


def flat_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The config as `section.key` -> text: what a tracking UI shows and filters runs by.

    Scalars as YAML would write them (`null`, `true`, `0.0001`); lists and free-form mappings
    (a DeepSpeed config) as one JSON string each, so every key of the config is one param."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        for f in dataclasses.fields(node):
            key, value = f"{prefix}{f.name}", getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(f"{key}.", value)
            elif isinstance(value, str):
                out[key] = value
            else:
                out[key] = json.dumps(value, sort_keys=True)

    walk("", cfg)
    return out


# ------------------------------------------------------------------------------------------
# The interface and its backends
# ------------------------------------------------------------------------------------------


class Tracker:
    """Where a run's numbers go besides the run directory. The base class drops everything."""

    name = "none"

    def log_round(self, record: Mapping[str, Any]) -> None:
        """A committed round: its metrics.jsonl line."""

    def log_eval(self, round_idx: int, metrics: Numbers) -> None:
        """Evaluation results of `round_idx`, named `eval/<set>/<metric>`."""

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        """Files to keep with the run (the report's plots)."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and let go; `status` (FINISHED, FAILED, KILLED) is what the trainer ended as."""


class TensorBoardTracker(Tracker):
    """Event files under RUN_DIR/tensorboard/<kind>; does nothing without the tensorboard extra."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, kind: str) -> None:
        self.scalars = ScalarLog(run_dir / TENSORBOARD_DIR / kind)

    def _add(self, round_idx: int, metrics: Numbers) -> None:
        for tag, value in metrics.items():
            self.scalars.add(tag, value, round_idx)
        self.scalars.flush()

    def log_round(self, record: Mapping[str, Any]) -> None:
        self._add(record["round"], round_metrics(record))

    def log_eval(self, round_idx: int, metrics: Numbers) -> None:
        self._add(round_idx, metrics)

    def close(self, status: str = "FINISHED") -> None:
        self.scalars.close()


def read_ids(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/tracking.json, or {} when there is none (or it is unreadable: a new run is made)."""
    try:
        ids = json.loads((run_dir / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def write_ids(run_dir: Path, backend: str, ids: dict[str, str]) -> None:
    """Record `backend`'s run ids in RUN_DIR/tracking.json, keeping the other backend's."""
    rundir.write_json_atomic(run_dir / TRACKING_FILE, {**read_ids(run_dir), backend: ids})


def _missing_extra(extra: str, setting: str) -> FedsimInputError:
    return FedsimInputError(
        f"{setting} is set but {extra} is not installed: pip install 'fedsim[{extra}]'"
    )


class MlflowTracker(Tracker):
    """One MLflow run per fedsim run, through `MlflowClient` (no global active run, no autolog,
    no context tags taken from the process)."""

    name = "mlflow"

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, owner: bool) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing_extra("mlflow", "tracking.mlflow.uri") from None
        m = cfg.tracking.mlflow
        self.client = MlflowClient(tracking_uri=m.uri)
        self.owner = owner
        known = read_ids(run_dir).get(self.name, {})
        run_id = known.get("run_id") if known.get("uri") == m.uri else None
        if run_id and self._exists(run_id):
            self.run_id = run_id
            if owner:  # a resumed trainer: the run is live again, with any new settings
                self.client.update_run(run_id, status="RUNNING")
                self._log_params(flat_params(cfg), resumed=True)
            return
        experiment = self.client.get_experiment_by_name(m.experiment)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(m.experiment)
        )
        run = self.client.create_run(
            experiment_id,
            run_name=m.run_name or cfg.run.name,
            tags={"fedsim.run_dir": str(run_dir.resolve())},
        )
        self.run_id = run.info.run_id
        write_ids(
            run_dir,
            self.name,
            {"uri": m.uri, "experiment_id": experiment_id, "run_id": self.run_id},
        )
        self._log_params(flat_params(cfg), resumed=False)

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage != "deleted"
        except MlflowException:  # deleted for good, or another server: start a new run
            return False

    def _log_params(self, params: dict[str, str], resumed: bool) -> None:
        from mlflow.entities import Param, RunTag

        params = {k: v[:MLFLOW_PARAM_CHARS] for k, v in params.items()}
        changed: dict[str, str] = {}
        if resumed:
            # MLflow refuses to change a param; a resumed run may have been extended (run.rounds)
            # or changed (--allow-config-change): new values go to tags `resumed.<key>` instead
            logged = self.client.get_run(self.run_id).data.params
            changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
            params = {k: v for k, v in params.items() if k not in logged}
        items = sorted(params.items())
        for start in range(0, len(items), MLFLOW_BATCH):
            batch = [Param(k, v) for k, v in items[start : start + MLFLOW_BATCH]]
            self.client.log_batch(self.run_id, params=batch)
        if changed:
            tags = [RunTag(f"resumed.{k}", v) for k, v in sorted(changed.items())]
            self.client.log_batch(self.run_id, tags=tags)

    def _metrics(self, step: int, metrics: Numbers) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in sorted(metrics.items())]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_round(self, record: Mapping[str, Any]) -> None:
        self._metrics(record["round"], round_metrics(record))

    def log_eval(self, round_idx: int, metrics: Numbers) -> None:
        self._metrics(round_idx, metrics)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path="report")

    def close(self, status: str = "FINISHED") -> None:
        if self.owner:  # only the trainer says how the run ended; eval and report add to it
            self.client.set_terminated(self.run_id, status=status)


class WandbTracker(Tracker):
    """One W&B run per fedsim run. Metrics are plotted against `round` (W&B's own step counter
    only grows, and the evaluator logs rounds the trainer has long passed)."""

    name = "wandb"

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, owner: bool) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing_extra("wandb", "tracking.wandb.project") from None
        w = cfg.tracking.wandb
        known = read_ids(run_dir).get(self.name, {})
        same = known.get("project") == w.project and known.get("entity", "") == w.entity
        run_id = known.get("run_id") if same else None
        directory = Path(w.dir).expanduser() if w.dir else run_dir
        rundir.make_dir(directory)
        settings = wandb.Settings(
            console="off",  # the run's output (paths, client errors) stays in its own log
            x_disable_stats=True,  # no system-metrics sampler beside a CPU-bound trainer
            save_code=False,
            x_save_requirements=False,
            silent=True,  # fedsim's own lines only; docs/tracking.md says where W&B writes
        )
        self.run = wandb.init(
            project=w.project,
            entity=w.entity or None,
            name=w.name or cfg.run.name,
            id=run_id,
            resume="allow" if run_id else None,
            mode=w.mode,
            dir=str(directory),
            # the trainer's settings; eval and report continue the run without re-sending them
            config=flat_params(cfg) if owner else None,
            reinit="create_new",  # never finish or reuse a run the calling program has open
            settings=settings,
        )
        if owner and run_id:
            self.run.config.update(flat_params(cfg), allow_val_change=True)
        self.run.define_metric("round")
        for pattern in ("train/*", "eval/*"):
            self.run.define_metric(pattern, step_metric="round")
        if not run_id:
            write_ids(
                run_dir,
                self.name,
                {"project": w.project, "entity": w.entity, "run_id": self.run.id},
            )

    def log_round(self, record: Mapping[str, Any]) -> None:
        self.run.log({"round": record["round"], **round_metrics(record)})

    def log_eval(self, round_idx: int, metrics: Numbers) -> None:
        self.run.log({"round": round_idx, **metrics})

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        files = Path(self.run.dir)
        for path in paths:
            # into the run's files as report/<name> (W&B's Files tab; `wandb sync` uploads them)
            copy = rundir.make_dir(files / "report") / path.name
            rundir.write_bytes_atomic(copy, path.read_bytes())
            self.run.save(str(copy), base_path=str(files), policy="now")

    def close(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


# ------------------------------------------------------------------------------------------
# The composite
# ------------------------------------------------------------------------------------------


class Trackers(Tracker):
    """Every configured backend. A backend that fails while logging is reported once on stderr
    and left out from then on: a tracking server going away never stops a training run."""

    name = "trackers"

    def __init__(self, backends: list[Tracker]) -> None:
        self.backends = backends

    def _each(self, what: str, *args: Any) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, what)(*args)
            except Exception as err:  # any library's error: drop the backend, keep the run
                self.backends.remove(backend)
                print(
                    f"fedsim: tracking: {backend.name} stopped after an error in {what} "
                    f"({type(err).__name__}: {err})",
                    file=sys.stderr,
                    flush=True,
                )

    def log_round(self, record: Mapping[str, Any]) -> None:
        self._each("log_round", record)

    def log_eval(self, round_idx: int, metrics: Numbers) -> None:
        self._each("log_eval", round_idx, metrics)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        self._each("log_artifacts", list(paths))

    def close(self, status: str = "FINISHED") -> None:
        self._each("close", status)
        self.backends = []

    # -- the ScalarLog calls of the evaluator (fedsim/eval/job.py) --

    def add_all(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Every number of `values` as `prefix/key` evaluation metrics of round `step`."""
        self.log_eval(step, {f"{prefix}/{k}": v for k, v in numbers(values).items()})

    def flush(self) -> None:
        """Nothing to do: every backend sends (or writes) as it logs."""

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.close("FAILED")


def _backends(cfg: ExperimentConfig, run_dir: Path, *, owner: bool) -> list[Tracker]:
    """The MLflow and W&B trackers `cfg.tracking` turns on (imports happen only here)."""
    out: list[Tracker] = []
    try:
        if cfg.tracking.mlflow.uri:
            out.append(MlflowTracker(cfg, run_dir, owner=owner))
        if cfg.tracking.wandb.project:
            out.append(WandbTracker(cfg, run_dir, owner=owner))
    except BaseException:
        Trackers(out).close("FAILED")
        raise
    return out


def train_tracker(run_dir: Path, cfg: ExperimentConfig) -> Trackers:
    """The trainer's trackers: TensorBoard's train/ log and the configured backends, which it
    creates (or, resumed, continues) and ends."""
    return Trackers([TensorBoardTracker(run_dir, "train"), *_backends(cfg, run_dir, owner=True)])


def eval_tracker(run_dir: Path, cfg: ExperimentConfig) -> Trackers:
    """`fedsim eval`'s trackers: TensorBoard's eval/ log and the configured backends' run."""
    return Trackers([TensorBoardTracker(run_dir, "eval"), *_backends(cfg, run_dir, owner=False)])


def run_config(run_dir: Path) -> ExperimentConfig | None:
    """RUN_DIR/config.yaml, or None when it cannot be read (the report shows the run anyway)."""
    try:
        return config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError, ConfigError, AttributeError, TypeError):
        return None


def log_report(run_dirs: Iterable[Path], out: Path) -> None:
    """`fedsim report`: the report's PNG plots (in `out`) as artifacts of every run among
    `run_dirs` whose config turns tracking on."""
    plots = sorted(out.glob("*.png"))
    if not plots:
        return
    for run_dir in run_dirs:
        cfg = run_config(run_dir)
        if cfg is None:
            continue
        backends = _backends(cfg, run_dir, owner=False)
        if backends:
            with Trackers(backends) as trackers:
                trackers.log_artifacts(plots)
