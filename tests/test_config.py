from pathlib import Path

import pytest

from fedsim.config import (
    ExperimentConfig,
    clients_per_round,
    config_from_dict,
    load_config,
)
from fedsim.errors import ConfigError, FedsimInputError

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def _problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return info.value.problems


def test_defaults_are_valid():
    cfg = config_from_dict({})
    assert cfg.server.strategy == "fedavg"
    assert cfg.run_dir == Path("runs/quickstart")


def test_unknown_key_is_named_with_its_dotted_path():
    (problem,) = _problems({"client": {"lrr": 0.1}})
    assert problem.startswith("client.lrr: unknown key")
    assert "lr" in problem


def test_wrong_type_is_named():
    (problem,) = _problems({"client": {"lr": "fast"}})
    assert problem == "client.lr: expected a number, got 'fast'"
    (problem,) = _problems({"data": {"num_clients": True}})
    assert problem.startswith("data.num_clients: expected an integer")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"client": {"lr": -1}}, "client.lr"),
        ({"data": {"num_clients": 0}}, "data.num_clients"),
        ({"server": {"clients_per_round": None, "fraction": 1.5}}, "server.fraction"),
        (
            {"server": {"clients_per_round": 30}, "data": {"num_clients": 20}},
            "server.clients_per_round",
        ),
        ({"client": {"batch_size": 6, "micro_batch_size": 4}}, "client.batch_size"),
        ({"data": {"partition": {"kind": "random"}}}, "data.partition.kind"),
        ({"data": {"partition": {"kind": "split_file"}}}, "data.partition.path"),
        ({"model": {"lora": {"dropout": 1.0}}}, "model.lora.dropout"),
        ({"client": {"local_epochs": 1.0}}, "client.local_steps"),
    ],
)
def test_out_of_range_values_name_the_field(raw, field):
    problems = _problems(raw)
    assert any(p.startswith(f"{field}:") for p in problems), problems


def test_every_problem_is_reported_at_once():
    problems = _problems({"client": {"lr": 0}, "run": {"rounds": -2}, "bogus": 1})
    assert len(problems) == 1  # unknown keys first: ranges are checked once the tree is well formed
    problems = _problems({"client": {"lr": 0}, "run": {"rounds": -2}})
    assert {p.split(":")[0] for p in problems} == {"client.lr", "run.rounds"}


def test_load_with_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("run:\n  name: x\nclient:\n  lr: 3e-4\n")
    cfg = load_config(path, ["client.lr=1e-3", "model.lora.target_modules=[q_proj, k_proj]"])
    assert cfg.client.lr == 1e-3
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj"]
    with pytest.raises(ConfigError, match=r"exp.yaml: server.nope: unknown key"):
        load_config(path, ["server.nope=1"])
    with pytest.raises(FedsimInputError, match="KEY=VALUE"):
        load_config(path, ["client.lr"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FedsimInputError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [\n")
    with pytest.raises(FedsimInputError, match=r"bad.yaml:.*not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = config_from_dict({"run": {"name": "rt"}, "server": {"clients_per_round": 3}})
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_training_hash_ignores_rounds_and_placement_only():
    base = config_from_dict({})
    more_rounds = config_from_dict({"run": {"rounds": 9}, "cluster": {"num_workers": 1}})
    other_lr = config_from_dict({"client": {"lr": 1e-3}})
    assert base.training_hash() == more_rounds.training_hash()
    assert base.training_hash() != other_lr.training_hash()


def test_clients_per_round_from_fraction():
    cfg = config_from_dict({"server": {"clients_per_round": None, "fraction": 0.25}})
    assert clients_per_round(cfg) == 5  # of the default 20 clients


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_validates(path):
    assert isinstance(load_config(path), ExperimentConfig)


def test_paths_expand_environment_variables(monkeypatch):
    monkeypatch.setenv("FEDSIM_DATA_DIR", "/data")
    raw = {"data": {"source": "${FEDSIM_DATA_DIR:-../shared/data}/dolly/x.jsonl"}}
    assert config_from_dict(raw).data.source == "/data/dolly/x.jsonl"
    monkeypatch.delenv("FEDSIM_DATA_DIR")
    assert config_from_dict(raw).data.source == "../shared/data/dolly/x.jsonl"
    (problem,) = _problems({"data": {"source": "${FEDSIM_NOT_SET_ANYWHERE}/x.jsonl"}})
    assert problem == "data.source: environment variable FEDSIM_NOT_SET_ANYWHERE is not set"


def test_client_ids_replace_sampling():
    cfg = config_from_dict({"server": {"client_ids": [3, 1]}, "data": {"num_clients": 4}})
    assert clients_per_round(cfg) == 2  # clients_per_round (default 5 > 4 clients) is ignored
    problems = _problems({"server": {"client_ids": [0, 4, 4]}, "data": {"num_clients": 4}})
    assert any(p.startswith("server.client_ids: [4, 4] out of range") for p in problems)
    assert any(p.startswith("server.client_ids: duplicate ids") for p in problems)
    (problem,) = _problems({"server": {"client_ids": []}})
    assert problem.startswith("server.client_ids: expected at least one client id")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"generation": {"max_new_tokens": 0}}, "eval.generation.max_new_tokens"),
        ({"generation": {"top_p": 0}}, "eval.generation.top_p"),
        ({"judge": {"concurrency": 0}}, "eval.judge.concurrency"),
        ({"judge": {"baseline": "round:x"}}, "eval.judge.baseline"),
        ({"judge": {"api_key_env": "sk-live-123"}}, "eval.judge.api_key_env"),
        ({"question_sets": []}, "eval.question_sets"),
    ],
)
def test_eval_values_name_the_field(raw, field):
    problems = _problems({"eval": raw})
    assert any(p.startswith(f"{field}:") for p in problems), problems
    assert not any("sk-live-123" in p for p in problems)  # a pasted key is never echoed


def test_eval_paths_stay_unexpanded_until_used(monkeypatch):
    from fedsim.config import resolve_path

    cfg = config_from_dict({})
    assert cfg.eval.questions_dir == "${FEDSIM_DATA_DIR:-../shared/data}/eval"
    monkeypatch.setenv("FEDSIM_DATA_DIR", "/data")
    assert resolve_path(cfg.eval.questions_dir, "eval.questions_dir") == "/data/eval"
