"""Fuzzing the config loader through `fedsim validate`: random YAML documents.

Three kinds of document: a valid tiny experiment with a few fields set to random values of any
type (deep into validate()), random trees of sections and keys (the loader's walk), and raw YAML
text built from snippets PyYAML treats specially (tags, anchors, dates, deep nesting, bad bytes).
Every example must exit 0 or 2 with one `fedsim: error:` line per problem naming the file or a
field, write nothing, and raise nothing.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedsim.config import ExperimentConfig, load_config
from tests.fuzz.fuzz_support import FAST, LONG, assert_sane_numbers, fuzz_cli

SECTIONS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))


def leaf_fields(cls: type = ExperimentConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted name -> type annotation of every non-section field."""
    hints = typing.get_type_hints(cls)
    leaves: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            leaves |= leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            leaves[f"{prefix}{f.name}"] = tp
    return leaves


LEAVES = leaf_fields()
ODD_STRINGS = (
    *("nan", "NaN", ".nan", "inf", "-inf", "1e999", "-1e999", "3e-4", "0x1F", "1_000", "1:30"),
    *("", " ", "~", "null", "yes", "off", "2020-13-45", ".", "..", "/", "a/b", "\0", "a\nb"),
    *("sk-live-1234567890", "${FEDSIM_FUZZ_UNSET}", "${HOME}/x", "~/x", "builtin:quickstart"),
    *("builtin:nope", "round:1", "round:x", "base", "q_proj", "x" * 300, "é", "\u202e", "\ufeff"),
)
BASE: dict[str, Any] = {
    "run": {"name": "fuzz", "output_dir": "runs", "rounds": 2},
    "data": {"builtin_records": 64, "num_clients": 4, "partition": {"kind": "iid"}},
    "model": {"name_or_path": "tiny"},
    "client": {"local_steps": 2, "batch_size": 2, "micro_batch_size": 2},
    "server": {"clients_per_round": 2},
}

ints = st.one_of(
    st.integers(-3, 40),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, 10**400]),
)
floats = st.one_of(st.floats(), st.sampled_from([1e-320, 1e308, -0.0, 0.5, 1.0]))
texts = st.one_of(st.text(max_size=12), st.sampled_from(ODD_STRINGS))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    floats,
    texts,
    st.binary(max_size=8),  # dumped as !!binary: bytes, a type no field takes
    st.dates(),
)
keys = st.one_of(
    texts, st.sampled_from([*SECTIONS, *(k.rsplit(".", 1)[-1] for k in LEAVES)]), ints, st.none()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


def typed_value(tp: Any, dotted: str) -> st.SearchStrategy[Any]:
    """Values of the field's own type, near and past its limits."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.none() | typed_value(inner, dotted)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return st.lists(typed_value(item, dotted), max_size=4)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return ints
    if tp is float:
        return floats | ints | st.sampled_from(["nan", "inf", "1e999", "3e-4", "fast"])
    if typing.get_origin(tp) is typing.Literal:  # the allowed values, and any other text
        return st.sampled_from(typing.get_args(tp)) | texts
    if tp is str:
        return texts
    return values  # Any: client.deepspeed, an inline mapping or a path


field_values = st.sampled_from(sorted(LEAVES)).flatmap(
    lambda d: st.tuples(st.just(d), st.one_of(typed_value(LEAVES[d], d), values))
)
unknown_keys = st.tuples(st.lists(keys.map(str), min_size=1, max_size=4).map(".".join), values)


def set_path(tree: dict[Any, Any], dotted: str, value: Any) -> None:
    """tree[a][b][c] = value for dotted a.b.c, making (or replacing) sections on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


@st.composite
def mutated_experiments(draw: st.DrawFn) -> dict[Any, Any]:
    """The base experiment with 0-4 fields set to random values and 0-2 unknown keys."""
    tree = _with_fields(draw(st.lists(field_values, max_size=4)))
    for dotted, value in draw(st.lists(unknown_keys, max_size=2)):
        set_path(tree, dotted, value)
    return tree


def _with_fields(pairs: list[tuple[str, Any]]) -> dict[Any, Any]:
    tree = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in pairs:
        set_path(tree, dotted, value)
    return tree


random_trees = st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS), keys), values | st.dictionaries(keys, values), max_size=5
)
deep_nesting = st.integers(1, 400).map(lambda n: {"run": {"name": _nest(n)}})


def _nest(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def dump(tree: Any) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


SNIPPETS = (
    "run: {name: x, seed: !!int abc}",
    "run:\n  name: 2020-13-45",
    "run:\n  name: !!timestamp 2001-02-30",
    "run: &a {name: *a}",
    "client:\n  deepspeed: &d {again: *d}",
    "client: {deepspeed: &l [*l]}",
    "client: {lr: !!python/object/apply:os.system ['touch pwned']}",
    "run: !!python/object:argparse.Namespace {name: x}",
    "client: {lr: !!float nan}",
    "client: {lr: 1:30.5}",
    "run: {rounds: 190:20:30}",
    "run: {rounds: 0b1010, seed: 0o17}",
    "run: {seed: " + "9" * 5000 + "}",
    "run: !!binary AAAA",
    "run: !!set {name, seed}",
    "run: !!omap [{name: x}]",
    "? [a, b]\n: 1",
    "? {run: 1}\n: 2",
    "<<: {run: {name: x}}",
    "run: {<<: *nowhere}",
    "run: {name: x}\nrun: {name: y}",
    "--- a\n--- b",
    "%YAML 1.1\n---\nrun: {}",
    "run:\n\tname: tab",
    "a: b: c",
    "'unterminated",
    'run: {name: "\\ud800"}',
    'run: {name: "\\x00"}',
    'run: {name: "\\e\\a"}',
    "data: {source: !!str 5}",
    "client: {deepspeed: {zero_optimization: {stage: .inf}}}",
    "client: {deepspeed: ./}",
    "run: {name: " + "[" * 300 + "]" * 300 + "}",
    "run: " + "{a: " * 200 + "1" + "}" * 200,
    "eval: {judge: {api_key_env: [sk-live-1234567890]}}",
)
TAGS = (
    *("!!int", "!!float", "!!bool", "!!timestamp", "!!binary", "!!null", "!!str", "!!set"),
    *("!!omap", "!!pairs", "!!seq", "!!map", "!!merge", "!!value", "!local", "!<tag:x>"),
    *("!!python/object:os.system", "!!python/name:os.system", "!!python/tuple"),
)
# A tag applied to a plain scalar (or nothing): PyYAML's constructors for explicit tags fail with
# IndexError, KeyError, AttributeError or ValueError as well as with YAMLError.
tagged = st.tuples(
    st.sampled_from(SECTIONS),
    st.sampled_from(TAGS),
    st.text(alphabet="0123456789abefxo+-.:_ tTZ", max_size=12),
).map(lambda t: f"{t[0]}: {{name: {t[1]} {t[2]}}}")
raw_texts = st.lists(
    st.one_of(st.sampled_from(SNIPPETS), tagged, st.just(dump(BASE)), st.text(max_size=20)),
    min_size=1,
    max_size=4,
).map("\n".join)


def as_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate escape stays, as bad UTF-8


documents = st.one_of(
    mutated_experiments().map(dump).map(as_bytes),
    st.lists(field_values, max_size=1).map(_with_fields).map(dump).map(as_bytes),
    random_trees.map(dump).map(as_bytes),
    deep_nesting.map(dump).map(as_bytes),
    raw_texts.map(as_bytes),
    st.binary(max_size=64),
    st.tuples(mutated_experiments().map(dump).map(as_bytes), st.binary(max_size=8)).map(
        lambda parts: parts[0] + parts[1]
    ),
)

FILE_LEVEL = re.compile(
    r"^(:\d+)?: (not valid YAML|not UTF-8 text|expected a mapping of sections|cannot read)"
)


def names_config_input(path: Path) -> typing.Callable[[str], bool]:
    """Whether an error message names the config file itself or a field of it."""

    def check(message: str) -> bool:
        if not message.startswith(str(path)):
            return False
        rest = message[len(str(path)) :]
        if FILE_LEVEL.match(rest):
            return True
        head, sep, tail = rest.removeprefix(": ").partition(": ")
        return bool(sep) and (head.split(".")[0].split("[")[0] in SECTIONS or "unknown key" in tail)

    return check


def check_validate(workdir: Path, document: bytes) -> None:
    path = workdir / "experiment.yaml"
    path.write_bytes(document)
    result = fuzz_cli(["validate", str(path)], workdir, [path], names_config_input(path))
    if result.code == 0:
        assert result.out == f"{path}: ok\n"
        assert_sane_numbers(load_config(path).to_dict())


@settings(FAST, max_examples=300)
@given(document=documents)
# What the fuzzer found in the loader before the fix (an uncaught exception or a wrong line):
@example(document=b"client:\n  lr: .nan\n")  # accepted, then trained on NaN
@example(document=b"client:\n  lr: " + b"1" * 400 + b"\n")  # OverflowError in float()
@example(document=b"run:\n  seed: !!int\n")  # IndexError inside PyYAML
@example(document=b"run:\n  seed: !!bool maybe\n")  # KeyError inside PyYAML
@example(document=b"run:\n  name: !!timestamp x\n")  # AttributeError inside PyYAML
@example(document=b"run:\n  name: 2020-13-45\n")  # ValueError: month must be in 1..12
@example(document=b"run: {name: " + b"[" * 2000 + b"}")  # RecursionError
@example(document=b"\x00")  # ReaderError: a two-line message
@example(document=b"client:\n  deepspeed: &d {again: *d}\n")  # refers to itself
@example(document=b'run:\n  "a\\nb": 1\n')  # unknown key with a line break
def test_validate_survives_random_config_files(workdir: Path, document: bytes) -> None:
    check_validate(workdir, document)


@pytest.mark.slow
@settings(LONG, max_examples=5000)
@given(document=documents)
def test_validate_survives_random_config_files_long(workdir: Path, document: bytes) -> None:
    check_validate(workdir, document)


def test_the_base_experiment_is_valid(workdir: Path) -> None:
    # The mutated documents start from it: if it were invalid, validate() would hardly be reached.
    check_validate(workdir, dump(BASE).encode())


# --- `fedsim partition` on the built-in data with random data.* settings: the partitioners ------

DATA_LEAVES = sorted(d for d in LEAVES if d.startswith("data.") and d != "data.source")
data_values = st.sampled_from(DATA_LEAVES).flatmap(
    lambda d: st.tuples(st.just(d), st.one_of(typed_value(LEAVES[d], d), st.integers(0, 70)))
)


def check_partition_settings(workdir: Path, pairs: list[tuple[str, Any]]) -> None:
    tree = _with_fields(pairs)
    records = tree["data"].get("builtin_records")
    if isinstance(records, int) and not isinstance(records, bool) and records > 400:
        tree["data"]["builtin_records"] = 400  # generating up to the 10**7 allowed takes minutes
    path = workdir / "experiment.yaml"
    path.write_text(dump(tree))
    names = names_config_input(path)

    def names_input(message: str) -> bool:
        return names(message) or message.startswith("data.")

    result = fuzz_cli(["partition", str(path)], workdir, [path], names_input)
    if result.code == 0:
        assert " clients, " in result.out.splitlines()[0]


@settings(FAST, max_examples=150)
@given(pairs=st.lists(data_values, max_size=4))
def test_partition_survives_random_data_settings(workdir: Path, pairs: list) -> None:
    check_partition_settings(workdir, pairs)


@pytest.mark.slow
@settings(LONG, max_examples=3000)
@given(pairs=st.lists(data_values, max_size=4))
def test_partition_survives_random_data_settings_long(workdir: Path, pairs: list) -> None:
    check_partition_settings(workdir, pairs)
