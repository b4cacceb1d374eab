"""`fedsim run` on bad input: exit code 2 and one line on stderr, before any training.

The contract (DESIGN.md §3 and §8): a bad config, data file, partition, model path or run directory
gets exactly one `fedsim: error: ...` line naming the field or file (and line) and what was
expected; Ray is never started, nothing is written, and an existing run directory is left exactly
as it was. Each test calls `fedsim.cli.main` in-process; the last one runs the real console script.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedsim.driver
import fedsim.prepare
from fedsim import checkpoint
from fedsim.cli import main

ERROR = "fedsim: error: "
RECORD = {"instruction": "Say hi.", "context": "", "response": "hi", "category": "greet"}


@pytest.fixture(autouse=True)
def no_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fail loudly if a run gets as far as Ray; keep any stray relative path inside tmp_path."""

    def ray_session(*args, **kwargs):
        raise AssertionError("bad input reached the Ray phase of run_experiment")

    monkeypatch.setattr(fedsim.driver, "ray_session", ray_session)
    monkeypatch.chdir(tmp_path)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root`, with the bytes of each file (None for a directory)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def run_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: object) -> str:
    """`fedsim run ARGV...` in-process: check that it exits 2 with one error line on stderr and
    writes nothing under tmp_path; return the message after `fedsim: error: `."""
    before = snapshot(tmp_path)
    code = main(["run", *map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(ERROR), err
    assert snapshot(tmp_path) == before
    return err.removeprefix(ERROR).rstrip("\n")


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def sets(*assignments: str) -> list[str]:
    """`--set` arguments for each `key=value`."""
    return [arg for a in assignments for arg in ("--set", a)]


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "overrides"),
    [
        pytest.param({"client": {"lrr": 0.1}}, [], id="in-file"),
        pytest.param({}, ["client.lrr=0.1"], id="set"),
    ],
)
def test_unknown_key_is_named(capsys, tmp_path, experiment_file, sections, overrides):
    cfg = experiment_file(**sections)

    message = run_fails(capsys, tmp_path, cfg, *sets(*overrides))

    assert message.startswith(f"{cfg}: client.lrr: unknown key; expected one of ")
    assert " lr," in message


def test_set_value_that_is_not_yaml_is_named(capsys, tmp_path, experiment_file):
    cfg = experiment_file()

    message = run_fails(capsys, tmp_path, cfg, *sets("client.lr=[1"))

    assert message.startswith("--set client.lr: value '[1' is not valid YAML")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["client.lr=fast"], "client.lr: expected a number, got 'fast'"),
        (["client.lr=-1"], "client.lr: expected a value > 0, got -1.0"),
        (["data.num_clients=0"], "data.num_clients: expected a value > 0, got 0"),
        (
            ["server.clients_per_round=null", "server.fraction=1.5"],
            "server.fraction: expected a value in (0, 1], got 1.5",
        ),
    ],
    ids=["wrong-type", "negative-lr", "zero-clients", "fraction-above-1"],
)
def test_wrong_type_or_out_of_range_value_is_named(
    capsys, tmp_path, experiment_file, overrides, expected
):
    cfg = experiment_file()

    message = run_fails(capsys, tmp_path, cfg, *sets(*overrides))

    assert message == f"{cfg}: {expected}"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(None, "{}: config file not found", id="missing"),
        pytest.param(b"run:\n  name: t\n   seed: 3\n", "{}:3: not valid YAML (", id="not-yaml"),
        pytest.param(
            b"run:\n  name: caf\xe9\n",
            "{}: not UTF-8 text",
            id="not-utf8",
        ),
        pytest.param(
            "directory",
            "{}: cannot read config file",
            id="a-directory",
        ),
    ],
)
def test_config_file_that_cannot_be_read_is_named(capsys, tmp_path, content, expected):
    cfg = tmp_path / "experiment.yaml"
    if content == "directory":
        cfg.mkdir()
    elif content is not None:
        cfg.write_bytes(content)

    message = run_fails(capsys, tmp_path, cfg)

    assert message.startswith(expected.format(cfg))


# --- data and partition ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards", "by_category"])
def test_more_clients_than_records_is_named(capsys, tmp_path, experiment_file, kind):
    cfg = experiment_file()

    message = run_fails(
        capsys,
        tmp_path,
        cfg,
        *sets("data.builtin_records=5", "data.num_clients=10", f"data.partition.kind={kind}"),
    )

    assert message == f"data.num_clients: 10 clients but only 5 training records (kind={kind})"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda path: None, "data.source: file not found: {}", id="missing"),
        pytest.param(Path.mkdir, "data.source: not a file: {}", id="a-directory"),
    ],
)
def test_data_file_that_cannot_be_read_is_named(capsys, tmp_path, experiment_file, make, expected):
    data = tmp_path / "x.jsonl"
    make(data)
    cfg = experiment_file(data={"source": str(data)})

    message = run_fails(capsys, tmp_path, cfg)

    assert message == expected.format(data)


def test_data_line_that_is_not_json_is_named_by_file_and_line(capsys, tmp_path, experiment_file):
    line = json.dumps(RECORD)
    data = write_jsonl(tmp_path / "d.jsonl", [line, line, '{"instruction": "Say hi.",', line])
    cfg = experiment_file(data={"source": str(data)})

    message = run_fails(capsys, tmp_path, cfg)

    assert message.startswith(f"{data}:3: not valid JSON (")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({}, ":2: record has no field 'response' (data.fields.response)", id="absent"),
        pytest.param(
            {"response": "answer"},
            ":1: record has no field 'answer' (data.fields.response)",
            id="mapped-to-nothing",
        ),
    ],
)
def test_record_missing_a_mapped_field_is_named(
    capsys, tmp_path, experiment_file, fields, expected
):
    no_response = {k: v for k, v in RECORD.items() if k != "response"}
    data = write_jsonl(
        tmp_path / "d.jsonl", [json.dumps(RECORD), json.dumps(no_response), json.dumps(RECORD)]
    )
    cfg = experiment_file(data={"source": str(data), "fields": fields})

    message = run_fails(capsys, tmp_path, cfg)

    assert message == f"{data}{expected}"


def test_split_file_with_an_empty_client_is_named(capsys, tmp_path, experiment_file):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"clients": [[0, 1, 2], []], "test": [3]}))
    cfg = experiment_file(
        data={"num_clients": 2, "partition": {"kind": "split_file", "path": str(split)}},
        server={"clients_per_round": 1},
    )

    message = run_fails(capsys, tmp_path, cfg)

    assert message == f"{split}: clients[1] is empty"


@pytest.mark.parametrize(
    ("partition", "expected"),
    [
        pytest.param(
            {"kind": "dirichlet", "alpha": 1.0, "min_size": 100},
            "data.partition: 6 clients x min_size=100 needs 600 records but there are 400",
            id="dirichlet-min-size-above-total",
        ),
        pytest.param(
            {"kind": "dirichlet", "alpha": 0.05, "min_size": 66},
            "data.partition: kind=dirichlet could not reach min_size=66 for 6 clients",
            id="dirichlet-min-size-unreachable",
        ),
    ],
)
def test_impossible_partition_is_named(capsys, tmp_path, experiment_file, partition, expected):
    cfg = experiment_file(data={"partition": partition})

    message = run_fails(capsys, tmp_path, cfg)

    assert message.startswith(expected)


def test_partition_that_leaves_a_client_empty_is_named(capsys, tmp_path, experiment_file):
    # by_category with 3 clients over 2 categories: clients 0 and 2 share category "a", which
    # has a single record, so client 2 would get nothing.
    rows = [{**RECORD, "category": c} for c in ("a", "b", "b")]
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    cfg = experiment_file(
        data={"source": str(data), "num_clients": 3, "partition": {"kind": "by_category"}},
        server={"clients_per_round": 1},
    )

    message = run_fails(capsys, tmp_path, cfg)

    assert message.startswith("data.partition: client 2 would get no records with kind=by_category")


# --- model and run directory ----------------------------------------------------------------------


def test_model_path_that_does_not_exist_is_named(capsys, tmp_path, experiment_file):
    model = tmp_path / "no-model"
    cfg = experiment_file(model={"name_or_path": str(model)})

    message = run_fails(capsys, tmp_path, cfg)

    assert message == f"model.name_or_path: no such directory: {model}"


def test_existing_run_directory_is_left_alone(capsys, tmp_path, experiment_file):
    cfg = experiment_file()
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "marker.txt").write_text("results worth keeping\n")

    message = run_fails(capsys, tmp_path, cfg)  # also checks that run_dir is byte-for-byte intact

    assert message.startswith(f"run directory {run_dir} already exists;")
    assert "--resume" in message
    assert "--overwrite" in message


def _empty_rounds(run_dir: Path) -> None:
    (run_dir / "rounds").mkdir()


def _corrupted_round(run_dir: Path) -> None:
    adapter = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32)}
    path = checkpoint.write_round(run_dir, 1, adapter, {"r": 4}, {}, {"config_hash": "x"})
    weights = path / checkpoint.ADAPTER_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # invert the last tensor byte: the sha256 in round.json no longer matches
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_empty_rounds, _corrupted_round], ids=["no-rounds", "corrupt"])
def test_resume_without_an_intact_round_is_refused(capsys, tmp_path, experiment_file, damage):
    cfg = experiment_file()
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.read_text())
    damage(run_dir)

    message = run_fails(capsys, tmp_path, cfg, "--resume")  # checks run_dir is intact

    assert message == f"--resume: {run_dir} has no intact round to resume from"


# --- the real process ----------------------------------------------------------------------------


def test_console_script_exits_2_with_one_line(tmp_path, experiment_file):
    cfg = experiment_file()
    script = Path(sys.executable).with_name("fedsim")  # the venv's entry point, fedsim.cli:main
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fedsim.cli"]
    before = snapshot(tmp_path)

    result = subprocess.run(
        [*command, "run", str(cfg), "--set", "client.lr=-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"{ERROR}{cfg}: client.lr: expected a value > 0, got -1.0"
    ]
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_directory_that_is_not_a_run(capsys, tmp_path, experiment_file):
    cfg = experiment_file()
    precious = tmp_path / "runs" / "t" / "thesis.tex"
    precious.parent.mkdir(parents=True)
    precious.write_text("years of work")

    message = run_fails(capsys, tmp_path, cfg, "--overwrite")

    assert message.startswith(f"--overwrite: {precious.parent} was not created by fedsim")
    assert precious.read_text() == "years of work"


@pytest.mark.parametrize("marker", [None, "a file a user happened to name so\n"])
def test_overwrite_refuses_a_folder_that_only_looks_like_a_run(
    capsys, tmp_path, experiment_file, marker
):
    cfg = experiment_file()
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("a user's own config\n")  # the old, fooled guard
    if marker is not None:
        (run_dir / ".fedsim-run").write_text(marker)

    message = run_fails(capsys, tmp_path, cfg, "--overwrite")

    assert message.startswith(f"--overwrite: {run_dir} was not created by fedsim")


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "../t", "/etc"])
def test_run_name_must_be_a_plain_folder_name(capsys, tmp_path, experiment_file, name):
    """The reported accident: in a project folder, run.name=.. with --overwrite deleted it."""
    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    (project / "config.yaml").write_text("run: {}\n")
    (project / "notes.md").write_text("keep me\n")
    cfg = experiment_file()

    message = run_fails(capsys, tmp_path, cfg, *sets(f"run.output_dir={project / 'runs'}"),
                        *sets(f"run.name={name}"), "--overwrite")  # fmt: skip

    assert "run.name: expected a" in message


def test_run_directory_may_not_contain_the_working_directory(
    capsys, tmp_path, experiment_file, monkeypatch
):
    work = tmp_path / "t"
    work.mkdir()
    (work / "notes.md").write_text("keep me\n")
    monkeypatch.chdir(work)
    cfg = experiment_file()

    message = run_fails(capsys, tmp_path, cfg, *sets(f"run.output_dir={tmp_path}"), "--overwrite")

    assert "contains the current directory" in message


# --- the model, checked before Ray starts ---------------------------------------------------------


def test_lora_target_that_the_model_lacks_is_named(capsys, tmp_path, experiment_file):
    cfg = experiment_file()

    message = run_fails(capsys, tmp_path, cfg, *sets("model.lora.target_modules=[no_such_proj]"))

    assert message.startswith("model.lora.target_modules: no module named 'no_such_proj'")
    assert "q_proj" in message  # what the model does have


def test_lora_rank_wider_than_the_layer_is_named(capsys, tmp_path, experiment_file):
    cfg = experiment_file()  # hidden size 32

    message = run_fails(capsys, tmp_path, cfg, *sets("model.lora.r=64"))

    assert message == "model.lora.r: rank 64 exceeds the width of 'q_proj' (32); expected a rank "\
        "of at most 32"  # fmt: skip


def _model_copy(tmp_path: Path, cfg: Path, keep) -> Path:
    """A copy of the tiny model's folder holding only the files `keep` accepts."""
    import shutil

    import yaml

    from fedsim.config import config_from_dict

    source = Path(fedsim.prepare.prepare_model(config_from_dict(yaml.safe_load(cfg.read_text()))))
    target = tmp_path / "model"
    target.mkdir()
    for f in source.iterdir():
        if keep(f.name):
            shutil.copy(f, target / f.name)
    return target


def test_a_model_with_only_pickled_weights_is_refused(capsys, tmp_path, experiment_file):
    cfg = experiment_file()
    model = _model_copy(tmp_path, cfg, lambda name: not name.endswith(".safetensors"))
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must never be loaded")
    cfg = experiment_file(model={"name_or_path": str(model)})

    message = run_fails(capsys, tmp_path, cfg)

    assert message.startswith(f"model.name_or_path: {model} has no .safetensors weights (found "
                              "only pytorch_model.bin, pickled weights)")  # fmt: skip


def test_a_model_without_a_tokenizer_is_named(capsys, tmp_path, experiment_file):
    cfg = experiment_file()
    model = _model_copy(tmp_path, cfg, lambda name: "token" not in name)
    cfg = experiment_file(model={"name_or_path": str(model)})

    message = run_fails(capsys, tmp_path, cfg)

    assert message.startswith(f"model.name_or_path: {model}: has no loadable tokenizer")


def test_resume_of_a_run_under_older_random_streams_is_refused(capsys, tmp_path, experiment_file):
    """A run whose round.json records no `random_streams` (fedsim before the streams table) would
    not continue as it began: refused by name, nothing touched."""
    cfg = experiment_file()
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.read_text())
    adapter = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32)}
    checkpoint.write_round(run_dir, 1, adapter, {"r": 4}, {}, {"config_hash": "x"})

    message = run_fails(capsys, tmp_path, cfg, "--resume")

    assert message.startswith(f"--resume: {run_dir / 'rounds' / 'round_0001'} was written by a "
                              "fedsim whose random streams (version 1) differ")  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["validate"], "fedsim validate: the following arguments are required: CONFIG"),
        (["run", "x.yaml", "--bogus"], "fedsim: unrecognized arguments: --bogus"),
        (["run", "x.yaml", "--set"], "fedsim run: argument --set: expected one argument"),
        (["nonsense"], "fedsim: argument COMMAND: invalid choice: 'nonsense'"),
    ],
)
def test_command_line_mistakes_get_one_line_and_exit_2(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(ERROR + expected), err
