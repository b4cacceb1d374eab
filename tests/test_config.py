import dataclasses
import re
import typing
from pathlib import Path

import pytest

from fedsim.config import (
    CompressionKind,
    DataFormat,
    Dtype,
    ExperimentConfig,
    PartitionKind,
    TemplateName,
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
        # checked only when the shards were built, after the model was prepared
        ({"data": {"template": "chatml"}}, "data.template"),
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


def test_clients_per_round_is_every_client_with_selection_all():
    cfg = config_from_dict({"server": {"selection": "all"}, "data": {"num_clients": 7}})
    assert clients_per_round(cfg) == 7  # server.clients_per_round (5) does not apply
    # robust rules are checked against the same round size: median with f=3 needs 7
    raw = {"server": {"selection": "all", "robust": {"rule": "median", "num_byzantine": 3}}}
    assert config_from_dict({**raw, "data": {"num_clients": 7}})
    (problem,) = _problems({**raw, "data": {"num_clients": 6}})
    assert problem.startswith("server.robust.rule: median with num_byzantine=3 needs at least 7")


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


# --- non-finite numbers, huge integers, secrets, and YAML that PyYAML cannot build -------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        ("nan", "nan"),  # strings the loader converts with float() (YAML 1.1 reads 3e-4 as one)
        ("inf", "inf"),
        ("1e999", "inf"),
        (10**400, "an integer too large for a float"),
    ],
    ids=["nan", "inf", "-inf", "str-nan", "str-inf", "str-1e999", "int-10**400"],
)
def test_float_fields_refuse_nan_and_infinity(value, shown):
    (problem,) = _problems({"client": {"lr": value}})
    assert problem == f"client.lr: expected a finite number, got {shown}"


def test_nan_from_the_command_line_is_refused(tmp_path, capsys):
    from fedsim.cli import main

    path = tmp_path / "exp.yaml"
    path.write_text("run:\n  name: x\n")
    for text, shown in ((".nan", "nan"), ("nan", "nan"), ("-.inf", "-inf"), ("1e999", "inf")):
        assert main(["validate", str(path), "--set", f"client.lr={text}"]) == 2
        err = capsys.readouterr().err
        assert err == f"fedsim: error: {path}: client.lr: expected a finite number, got {shown}\n"


def test_free_form_deepspeed_mapping_refuses_non_finite_numbers(tmp_path):
    (problem,) = _problems({"client": {"deepspeed": {"optimizer": {"params": [1, float("nan")]}}}})
    assert problem == "client.deepspeed.optimizer.params[1]: expected a finite number, got nan"
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 0}, "gradient_clipping": Infinity}')
    (problem,) = _problems({"client": {"deepspeed": str(ds)}})
    assert problem == "client.deepspeed.gradient_clipping: expected a finite number, got inf"


def test_free_form_mapping_that_refers_to_itself_is_refused(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("client:\n  deepspeed: &ds\n    again: *ds\n")
    with pytest.raises(ConfigError, match=r"client\.deepspeed\.again: refers to itself"):
        load_config(path)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"run": {"rounds": 10**30}}, "run.rounds"),
        ({"run": {"seed": 2**64}}, "run.seed"),
        ({"data": {"num_clients": 10**12}}, "data.num_clients"),
        ({"data": {"builtin_records": 10**12}}, "data.builtin_records"),
        ({"client": {"local_steps": 10**12}}, "client.local_steps"),
        ({"client": {"batch_size": 2**40, "micro_batch_size": 2**40}}, "client.batch_size"),
        ({"model": {"lora": {"r": 10**9}}}, "model.lora.r"),
        ({"model": {"tiny": {"pretrain_steps": 10**12}}}, "model.tiny.pretrain_steps"),
        ({"eval": {"generation": {"seed": 2**70}}}, "eval.generation.seed"),
        ({"server": {"client_ids": [2**64]}}, "server.client_ids[0]"),
    ],
)
def test_absurdly_large_integers_are_refused_by_name(raw, field):
    problems = _problems(raw)
    assert any(p.startswith(f"{field}: expected") for p in problems), problems


@pytest.mark.parametrize("value", ["sk-live-1234567890", 123456789, ["sk-live-1234567890"]])
def test_type_error_on_a_secret_field_does_not_echo_the_value(value):
    (problem,) = _problems({"eval": {"judge": {"api_key_env": value}}})
    assert problem.startswith("eval.judge.api_key_env: expected")
    assert "1234567890" not in problem and "123456789" not in problem
    if not isinstance(value, str):
        assert problem.endswith(f"got {'a list' if isinstance(value, list) else 'an integer'}")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2020-13-45", "month must be in 1..12"),  # a date that is not one
        ("!!int abc", "invalid literal"),
        ("[" * 2000, "nested too deeply"),
    ],
    ids=["bad-date", "bad-int-tag", "deep"],
)
def test_yaml_that_cannot_be_built_is_one_line_naming_the_file(tmp_path, value, reason):
    path = tmp_path / "exp.yaml"
    path.write_text(f"run:\n  name: {value}\n")
    with pytest.raises(FedsimInputError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and reason in message and "\n" not in message
    with pytest.raises(FedsimInputError) as info:
        load_config(_empty(tmp_path), [f"run.name={value}"])
    message = str(info.value)
    assert message.startswith("--set run.name: value") and reason in message
    assert "\n" not in message


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    return path


@pytest.mark.parametrize("key", ["client..lr", ".lr", "client.", "client. .lr"])
def test_override_with_an_empty_key_part_is_refused(tmp_path, key):
    with pytest.raises(FedsimInputError, match=r"^--set .*: empty name between dots"):
        load_config(_empty(tmp_path), [f"{key}=1"])


def test_unknown_key_with_a_line_break_stays_on_one_line():
    (problem,) = _problems({"run": {"a\nb": 1}})
    assert problem.startswith("run.'a\\nb': unknown key") and "\n" not in problem


@pytest.mark.parametrize("name", [".", "..", "x" * 256])
def test_run_name_that_is_not_a_folder_name_is_refused(name):
    # "." would make the run directory output_dir itself, ".." its parent: --overwrite would
    # then replace a folder that is not a run.
    problems = _problems({"run": {"name": name}})
    assert any(p.startswith("run.name: expected") for p in problems), problems


@pytest.mark.parametrize(
    ("value", "reason"),
    [("runs\0x", "contains a NUL character"), ("runs\udcff", "is not valid Unicode text")],
    ids=["nul", "lone-surrogate"],
)
def test_strings_that_no_path_or_file_can_hold_are_refused(tmp_path, value, reason):
    (problem,) = _problems({"run": {"output_dir": value}})
    assert problem == f"run.output_dir: {reason}"
    (problem,) = _problems({"client": {"deepspeed": {"zero_optimization": {"x": value}}}})
    assert problem == f"client.deepspeed.zero_optimization.x: {reason}"
    (problem,) = _problems({"client": {"deepspeed": value}})  # a path: read at load time
    assert problem == f"client.deepspeed: {reason}"


def test_deepspeed_file_with_a_huge_integer_or_deep_nesting_is_one_line(tmp_path):
    ds = tmp_path / "ds.json"
    for text in ('{"stage": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000):
        ds.write_text(text)
        (problem,) = _problems({"client": {"deepspeed": str(ds)}})
        assert problem.startswith(f"client.deepspeed: {ds}: not valid JSON (")
        assert "\n" not in problem


def test_a_document_that_is_not_a_mapping_is_refused_even_when_falsy(tmp_path):
    path = tmp_path / "exp.yaml"
    for text in ("[]\n", "0\n", "false\n", "''\n"):
        path.write_text(text)
        with pytest.raises(FedsimInputError, match=r"expected a mapping of sections"):
            load_config(path)


def test_set_value_of_a_secret_field_that_is_not_yaml_is_not_echoed(tmp_path):
    with pytest.raises(FedsimInputError) as info:
        load_config(_empty(tmp_path), ["eval.judge.api_key_env='sk-live-1234567890"])
    assert str(info.value) == "--set eval.judge.api_key_env: value is not valid YAML"


@pytest.mark.parametrize("value", ["!!int", "!!float", "!!bool maybe", "!!timestamp x"])
def test_explicit_tag_on_the_wrong_scalar_is_one_line(tmp_path, value):
    # Found by tests/fuzz/test_fuzz_config.py: PyYAML's constructors raise IndexError, KeyError
    # or AttributeError here, not YAMLError.
    path = tmp_path / "exp.yaml"
    path.write_text(f"run:\n  seed: {value}\n")
    with pytest.raises(FedsimInputError, match=rf"^{re.escape(str(path))}: not valid YAML \("):
        load_config(path)
    with pytest.raises(FedsimInputError, match=r"^--set run\.seed: value .* is not valid YAML"):
        load_config(_empty(tmp_path), [f"run.seed={value}"])


# --- config.py is the single schema -----------------------------------------------------------


def _leaf_types(cls: type = ExperimentConfig, prefix: str = "") -> dict[str, object]:
    """Dotted name -> annotation of every leaf field, walked independently of the loader."""
    hints = typing.get_type_hints(cls)
    leaves: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            leaves |= _leaf_types(hints[f.name], f"{prefix}{f.name}.")
        else:
            leaves[f"{prefix}{f.name}"] = hints[f.name]
    return leaves


def _literal(tp: object) -> tuple[str, ...] | None:
    """The values of a Literal annotation (also inside `X | None`), or None for other types."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(inner) == 1 and typing.get_origin(inner[0]) is typing.Literal:
        return typing.get_args(inner[0])
    return None


CHOICE_FIELDS = {d: _literal(tp) for d, tp in _leaf_types().items() if _literal(tp)}


def _nested(dotted: str, value: object) -> dict:
    *parents, leaf = dotted.split(".")
    tree: dict = {leaf: value}
    for part in reversed(parents):
        tree = {part: tree}
    return tree


def test_every_closed_choice_is_a_literal():
    """The fields with a fixed set of values, each typed as one (a plain `str` would let any
    value through the loader)."""
    assert set(CHOICE_FIELDS) == {
        "data.format", "data.template", "data.partition.kind", "model.dtype",
        "model.quantization", "client.backend", "client.lr_scheduler", "client.compression.kind",
        "server.strategy", "server.selection", "server.weighting",
        "server.availability.distribution", "server.robust.rule", "cluster.data_transport",
        "tracking.wandb.mode", "server.mode", "server.staleness.rule",
    }  # fmt: skip


@pytest.mark.parametrize("dotted", sorted(CHOICE_FIELDS))
def test_a_value_outside_a_literal_is_named_with_the_choices(dotted):
    allowed = ", ".join(CHOICE_FIELDS[dotted])
    (problem,) = _problems(_nested(dotted, "nope"))
    null = "null or " if dotted == "model.quantization" else ""
    assert problem == f"{dotted}: expected {null}one of {allowed}, got 'nope'"
    (problem,) = _problems(_nested(dotted, 3))  # not a string at all
    assert problem == f"{dotted}: expected {null}one of {allowed}, got 3"


@pytest.mark.parametrize("dotted", sorted(CHOICE_FIELDS))
def test_every_literal_value_loads(dotted):
    for value in CHOICE_FIELDS[dotted]:
        try:
            cfg = config_from_dict(_nested(dotted, value))
        except ConfigError as err:  # a cross-field rule may refuse it, never the type check
            assert not any(p.startswith(f"{dotted}: expected") for p in err.problems), err
            continue
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        assert node == value


def test_every_field_has_a_docstring():
    """The configuration reference lists a field without one as undocumented: there are none."""
    from fedsim import config_docs

    undocumented = [
        k.dotted
        for top in config_docs.build_tree()
        for section in top.walk()
        for k in section.keys
        if not k.doc
    ]
    assert undocumented == []
    assert config_docs.UNDOCUMENTED not in config_docs.render()


def test_template_registry_matches_the_schema():
    from fedsim.data.templates import TEMPLATES

    assert sorted(TEMPLATES) == sorted(typing.get_args(TemplateName))


def test_partitioners_implement_exactly_the_schema_kinds():
    from fedsim.data.partitioners import make_partitioner

    for kind in typing.get_args(PartitionKind):
        assert make_partitioner(kind, path="split.json").kind == kind
    with pytest.raises(FedsimInputError, match="expected one of iid, dirichlet"):
        make_partitioner("random")


def test_compression_implements_every_schema_kind():
    import torch

    from fedsim.compression import compress, decompress

    delta = {"w": torch.tensor([0.5, -1.0, 0.25, 0.0])}
    for kind in typing.get_args(CompressionKind):
        if kind == "none":  # sent as it is, never through compress()
            continue
        back = decompress(compress(delta, kind, topk_fraction=1.0), delta, kind)
        assert back["w"].tolist() == pytest.approx(delta["w"].tolist(), abs=0.01), kind


def test_loaders_accept_exactly_the_schema_choices():
    from fedsim.data.sources import FORMATS
    from fedsim.model import _DTYPES

    assert sorted(FORMATS) == sorted(typing.get_args(DataFormat))
    assert sorted(_DTYPES) == sorted(typing.get_args(Dtype))
