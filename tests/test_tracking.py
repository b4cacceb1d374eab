"""Experiment tracking to MLflow and W&B, read back through the libraries themselves.

Config checks and the composite tracker are unit tests. Then one small real fedsim run
(module-scoped, shared by the assertions below) trains a round with both trackers on, is
evaluated by `fedsim eval` with a judge on 127.0.0.1 whose key sits in the environment, and gets
a `fedsim report`; the slow tier resumes it for a second round. MLflow is a real `mlflow server`
on 127.0.0.1 (SQLite store, artifacts in tmp); W&B runs offline and its .wandb files are decoded
into the installed wandb's own protobuf records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest

from fedsim.config import ExperimentConfig, config_from_dict
from fedsim.errors import ConfigError, FedsimInputError
from fedsim.tracking import (
    TRACKING_FILE,
    Tracker,
    Trackers,
    eval_tracker,
    flat_params,
    numbers,
    round_metrics,
    train_tracker,
)
from tests.conftest import config_leaf_keys, tiny_experiment
from tests.eval.conftest import SECRET, JudgeServer, judge_settings, leaks

KEY_ENV = "FEDSIM_TEST_JUDGE_KEY"  # the variable judge_settings names
QUESTIONS = 4  # eval.max_questions: enough for every metric, cheap to generate


# --- config ---------------------------------------------------------------------------------------


def _config(**tracking: Any) -> ExperimentConfig:
    return config_from_dict({"tracking": tracking})


def test_tracking_is_off_by_default_and_outside_the_training_hash():
    plain = ExperimentConfig()
    assert plain.tracking.mlflow.uri == "" and plain.tracking.wandb.project == ""
    on = _config(
        mlflow={"uri": "http://127.0.0.1:5000", "experiment": "e", "run_name": "r"},
        wandb={"project": "p", "entity": "me", "mode": "online", "dir": "/tmp/w"},
    )
    assert on.training_hash() == plain.training_hash()  # so it can be turned on for --resume


@pytest.mark.parametrize(
    ("tracking", "problem"),
    [
        ({"wandb": {"mode": "cloud"}}, "tracking.wandb.mode: expected one of"),
        (
            {"mlflow": {"uri": "https://me:hunter2@mlflow.example.com"}},
            "tracking.mlflow.uri: no credentials in the URI",
        ),
        ({"mlflow": {"uri": "http://"}}, "tracking.mlflow.uri: expected a host"),
        ({"mlflow": {"uri": "http://x", "experiment": " "}}, "tracking.mlflow.experiment:"),
        ({"wandb": {"project": "a/b"}}, "tracking.wandb.project: expected at most 128"),
        ({"mlflow": {"url": "http://x"}}, "tracking.mlflow.url"),  # unknown key
    ],
)
def test_bad_tracking_values_are_config_errors(tracking, problem):
    with pytest.raises(ConfigError) as err:
        _config(**tracking)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(problem)
    assert "hunter2" not in str(err.value)


def test_params_are_the_config_flattened():
    cfg = _config(wandb={"project": "p"})
    params = flat_params(cfg)
    assert params["client.lr"] == json.dumps(cfg.client.lr)
    assert params["model.lora.target_modules"] == json.dumps(cfg.model.lora.target_modules)
    assert params["tracking.wandb.project"] == "p" and params["run.name"] == cfg.run.name
    assert params["eval.judge.api_key_env"] == "OPENAI_API_KEY"  # the name, never a value
    # one param per key of the config, none lost
    assert sorted(params) == sorted(config_leaf_keys(cfg))


def test_numbers_keep_finite_numbers_only():
    values = {"round": 3, "loss": 0.5, "n": 2, "ok": True, "name": "x", "nan": float("nan")}
    assert numbers(values) == {"loss": 0.5, "n": 2.0}


def test_round_metrics_flatten_the_probes_exact_match_per_category():
    record = {"round": 2, "train_loss": 0.5, "exact_match_by_category": {"add": 0.4, "sort": 1}}

    assert round_metrics(record) == {
        "train/train_loss": 0.5,
        "train/exact_match/add": 0.4,
        "train/exact_match/sort": 1.0,
    }


class _Broken(Tracker):
    name = "broken"

    def log_round(self, record: Any) -> None:
        raise ConnectionError("server went away")


class _Kept(Tracker):
    name = "kept"

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def log_round(self, record: Any) -> None:
        self.rounds.append(record["round"])


def test_a_failing_backend_is_dropped_and_the_others_keep_logging(capsys):
    kept, broken = _Kept(), _Broken()
    trackers = Trackers([broken, kept])
    for r in (1, 2):
        trackers.log_round({"round": r, "train_loss": 1.0})
    assert kept.rounds == [1, 2] and trackers.backends == [kept]
    err = capsys.readouterr().err
    assert err.count("tracking: broken stopped") == 1 and "server went away" in err


def test_nothing_is_imported_or_written_unless_configured(tmp_path, monkeypatch):
    """Without tracking config neither library is imported (made unimportable here, as in an
    install without the extras) and no tracking.json is written; with it, the missing extra is a
    one-line input error that says what to install."""
    for name in ("mlflow", "mlflow.tracking", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    for make in (train_tracker, eval_tracker):
        with make(tmp_path, ExperimentConfig()) as trackers:
            trackers.log_round({"round": 1, "train_loss": 1.0})
            trackers.log_eval(1, {"eval/test/loss": 1.0})
        assert [b.name for b in trackers.backends] == []  # closed
    assert not (tmp_path / TRACKING_FILE).exists()
    for tracking, extra in (
        ({"mlflow": {"uri": "http://127.0.0.1:9"}}, "mlflow"),
        ({"wandb": {"project": "p"}}, "wandb"),
    ):
        with pytest.raises(FedsimInputError, match=rf"pip install 'fedsim\[{extra}\]'"):
            train_tracker(tmp_path, _config(**tracking))


# --- a real run, tracked --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1: SQLite backend store, artifacts proxied into tmp."""
    # the dev extra installs the client and what its server needs; without them, skip
    for module in ("mlflow", "flask", "sqlalchemy", "alembic", "wandb"):
        pytest.importorskip(module, reason="needs the dev extra (fedsim[mlflow,wandb] + server)")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = (root / "server.log").open("wb")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        # no background job runner: the tests need the REST API only, and the CPUs are few
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri, root
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def tracked(ray_local, mlflow_server, tmp_path_factory):
    """One round trained with MLflow and W&B on, evaluated with the judge, reported; the judge's
    key is in the environment throughout. `test_resume_continues_the_same_runs` (slow) adds a
    second round to it, last."""
    from fedsim.cli import main
    from fedsim.driver import run_experiment

    uri, mlflow_root = mlflow_server
    tmp = tmp_path_factory.mktemp("tracked")
    raw = tiny_experiment(
        tmp,
        run={"name": "tracked", "rounds": 1},
        data={"test_per_category": 2},  # as the other tests: their cached tiny model is reused
        client={"local_steps": 1},
        server={"clients_per_round": 2},
        cluster={"num_workers": 1},
        eval={"judge": {"api_key_env": KEY_ENV}},
        tracking={
            "mlflow": {"uri": uri, "experiment": "fedsim-test"},
            "wandb": {"project": "fedsim-test", "mode": "offline"},
        },
    )
    judge = JudgeServer().start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, SECRET)
        env.setenv("WANDB_MODE", "offline")
        run_dir = run_experiment(
            config_from_dict(raw), log=lambda _: None, show_progress=False
        ).run_dir
        settings = judge_settings(judge, tmp, **{"eval.judge.single": "true"})
        settings += ["--set", f"eval.max_questions={QUESTIONS}"]
        assert main(["eval", str(run_dir), "--all", *settings]) == 0
        assert main(["report", str(run_dir)]) == 0
    judge.stop()
    assert judge.requests  # the key was really sent, to the judge
    return {
        "raw": raw,
        "run_dir": run_dir,
        "ids": json.loads((run_dir / TRACKING_FILE).read_text()),
        "uri": uri,
        "mlflow_root": mlflow_root,
        "tmp": tmp,
    }


def assert_series(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """The same steps, and values equal up to float32 rounding (W&B and MLflow store doubles;
    TensorBoard would not)."""
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-9)


def _metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _eval_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def mlflow_series(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.mark.ray
def test_mlflow_run_holds_params_metrics_eval_and_plots(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked["uri"])
    run_dir = tracked["run_dir"]
    ids = tracked["ids"]["mlflow"]
    assert ids["uri"] == tracked["uri"]
    # the evaluator and the report added to the trainer's run: one run in the experiment
    experiment = client.get_experiment_by_name("fedsim-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["run_id"]]
    run = client.get_run(ids["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.tags["fedsim.run_dir"] == str(run_dir.resolve())

    params = run.data.params
    assert params["client.local_steps"] == "1" and params["run.name"] == "tracked"
    assert params["run.rounds"] == "1" and params["tracking.mlflow.experiment"] == "fedsim-test"
    assert params["model.lora.target_modules"] == '["q_proj", "v_proj"]'

    (line,) = _metrics_lines(run_dir)
    for key in ("train_loss", "samples", "seconds", "checkpoint_seconds", "driver_peak_rss_mb"):
        assert_series(mlflow_series(client, ids["run_id"], f"train/{key}"), [(1, line[key])])

    evals = _eval_lines(run_dir)
    for name in ("loss", "exact_match", "rouge_l", "judge_score"):
        expected = [(e["round"], e[name]) for e in evals if e.get(name) is not None]
        assert expected, name
        assert_series(mlflow_series(client, ids["run_id"], f"eval/test/{name}"), expected)

    plots = {Path(f.path).name for f in client.list_artifacts(ids["run_id"], "report")}
    assert plots == {p.name for p in (run_dir / "report").glob("*.png")}
    assert "train_loss.png" in plots
    local = client.download_artifacts(ids["run_id"], "report/train_loss.png", str(tracked["tmp"]))
    assert Path(local).read_bytes() == (run_dir / "report" / "train_loss.png").read_bytes()


# --- W&B offline: the .wandb files, decoded -------------------------------------------------------

# A .wandb file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
# 32 KiB blocks of chunks, each with a 7-byte header (crc32 of type+data, length, type) and a
# protobuf `Record` split over FULL / FIRST / MIDDLE / LAST chunks. wandb 0.31 writes it from its
# Go core and no longer ships a Python reader, so this is one, around wandb's own `Record`.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list[Any]:
    """Every record of an offline run's .wandb file, as wandb's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:_HEADER]) == (b":W&B", 0xBEE1, 0)
    pos, pending, records = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: damaged chunk at {pos}"
        if kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk if kind == _LAST else chunk)
            records.append(record)
            pending = b""
    return records


def _wandb_runs(run_dir: Path) -> list[tuple[Path, list[Any]]]:
    """(offline-run folder, its records) for each process that wrote to W&B, oldest first."""
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    return [(f, read_wandb_records(next(f.glob("*.wandb")))) for f in folders]


@dataclasses.dataclass
class WandbRun:
    """What the offline-run folders of a fedsim run hold, merged in the order they were written
    (as `wandb sync` would send them)."""

    folders: list[Path]
    run_ids: set[str]
    config: dict[str, Any]
    history: dict[str, list[tuple[int, float]]]
    files: set[str]


def wandb_run(run_dir: Path) -> WandbRun:
    out = WandbRun(sorted((run_dir / "wandb").glob("offline-run-*")), set(), {}, {}, set())
    for folder in out.folders:
        for record in read_wandb_records(next(folder.glob("*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.project == "fedsim-test"
                out.run_ids.add(record.run.run_id)
                updates = record.run.config.update
            elif kind == "config":
                updates = record.config.update
            else:
                updates = []
            out.config.update({u.key: json.loads(u.value_json) for u in updates})
            if kind == "history":
                row = {
                    "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                    for i in record.history.item
                }
                for key, value in row.items():
                    if key.startswith(("train/", "eval/")):
                        out.history.setdefault(key, []).append((row["round"], value))
            elif kind == "files":
                for f in record.files.files:
                    out.files.add(f.path)
                    assert (folder / "files" / f.path).is_file(), f.path
    return out


@pytest.mark.ray
def test_wandb_offline_run_holds_config_metrics_eval_and_plots(tracked):
    run_dir = tracked["run_dir"]
    assert tracked["ids"]["wandb"]["project"] == "fedsim-test"
    written = wandb_run(run_dir)
    # the trainer, the evaluator and the report each wrote an offline folder of the one run
    assert len(written.folders) == 3
    assert written.run_ids == {tracked["ids"]["wandb"]["run_id"]}
    assert written.config["client.local_steps"] == "1" and written.config["run.name"] == "tracked"
    assert written.config["run.rounds"] == "1"
    (line,) = _metrics_lines(run_dir)
    for key in ("train_loss", "samples", "seconds"):
        assert_series(written.history[f"train/{key}"], [(1, line[key])])
    evals = _eval_lines(run_dir)
    for name in ("loss", "exact_match", "rouge_l", "judge_score"):
        expected = [(e["round"], e[name]) for e in evals if e.get(name) is not None]
        assert expected, name
        assert_series(written.history[f"eval/test/{name}"], expected)
    plots = {f"report/{p.name}" for p in (run_dir / "report").glob("*.png")}
    assert "report/train_loss.png" in plots and plots <= written.files


# --- the key ------------------------------------------------------------------------------------


@pytest.mark.ray
def test_the_judge_key_reaches_no_tracker(tracked):
    """The key was in the environment of the trainer, the evaluator (which sent it to the judge)
    and the report: no piece of it is in MLflow's database or artifacts, in W&B's files, or
    anywhere in the run directory."""
    from mlflow.tracking import MlflowClient

    roots = [tracked["mlflow_root"], tracked["run_dir"]]
    assert (tracked["mlflow_root"] / "mlflow.db").stat().st_size > 0
    assert list((tracked["run_dir"] / "wandb").rglob("*.wandb"))
    client = MlflowClient(tracking_uri=tracked["uri"])
    run = client.get_run(tracked["ids"]["mlflow"]["run_id"])
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(run.data.metrics)]
    assert leaks([SECRET], roots, texts) == []
    assert run.data.params["eval.judge.api_key_env"] == KEY_ENV  # the name is logged, only


# --- resume ---------------------------------------------------------------------------------------


@pytest.mark.slow  # a second trainer start (~15 s); runs last, as it extends the shared run
@pytest.mark.ray
def test_resume_continues_the_same_runs(tracked):
    """`--resume` with run.rounds raised to 2: round 2 lands in the same MLflow and W&B runs, and
    the new rounds value is recorded (MLflow keeps a param's first value: a `resumed.` tag)."""
    from mlflow.tracking import MlflowClient

    from fedsim.driver import run_experiment

    run_dir = tracked["run_dir"]
    raw = {**tracked["raw"], "run": {**tracked["raw"]["run"], "rounds": 2}}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        run_experiment(config_from_dict(raw), resume=True, log=lambda _: None, show_progress=False)
    assert json.loads((run_dir / TRACKING_FILE).read_text()) == tracked["ids"]

    client = MlflowClient(tracking_uri=tracked["uri"])
    run_id = tracked["ids"]["mlflow"]["run_id"]
    experiment = client.get_experiment_by_name("fedsim-test")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["run.rounds"] == "1" and run.data.tags["resumed.run.rounds"] == "2"
    lines = _metrics_lines(run_dir)
    expected = [(m["round"], m["train_loss"]) for m in lines]
    assert [r for r, _ in expected] == [1, 2]
    assert_series(mlflow_series(client, run_id, "train/train_loss"), expected)

    written = wandb_run(run_dir)
    assert len(written.folders) == 4 and written.run_ids == {tracked["ids"]["wandb"]["run_id"]}
    assert written.config["run.rounds"] == "2"
    assert_series(written.history["train/train_loss"], expected)
