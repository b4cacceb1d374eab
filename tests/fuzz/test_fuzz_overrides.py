"""Fuzzing `--set KEY=VALUE` through `fedsim validate <valid config> --set ...`.

Random assignments: known and unknown dotted keys, empty parts, missing `=`, unicode and
argument bytes that were not UTF-8 (surrogate escapes), values that are YAML syntax errors, tags
PyYAML's safe loader must refuse (`!!python/object...`), and random YAML values. Every example
exits 0 or 2 with one `fedsim: error:` line per problem, writes nothing, raises nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedsim.config import load_config
from tests.fuzz.fuzz_support import FAST, LONG, assert_sane_numbers, fuzz_cli
from tests.fuzz.test_fuzz_config import BASE, LEAVES, SECTIONS, TAGS, field_values, values

VALUES = (
    *(".nan", "nan", "-.inf", "1e999", "1e-999", "0x10", "0o17", "1:30", "1_000", "~", ""),
    *("[1", "{a: 1", "'unterminated", '"\\ud800"', '"\\x00"', "a: b: c", "- a\n- b", "\t"),
    *("&a [*a]", "*nowhere", "2020-13-45", "!!int", "!!int abc", "!!bool maybe", "[" * 500),
    *("!!python/object/apply:os.system ['touch pwned']", "!!python/object:os.system {}"),
    *("!!python/name:os.system", "!!python/module:os", "!!binary AAAA", "!!set {a}"),
    *("9" * 5000, "sk-live-1234567890", "[q_proj]", "{stage: 2}", "null", "true"),
)
key_parts = st.one_of(
    st.sampled_from([*SECTIONS, *(k.rsplit(".", 1)[-1] for k in LEAVES)]),
    st.text(max_size=6),
    st.sampled_from(["", " ", "\udcff", "é", "a\nb", "0", "-"]),  # \udcff: argv byte 0xff
)
keys = st.one_of(
    st.sampled_from(sorted(LEAVES)),
    st.lists(key_parts, min_size=1, max_size=4).map(".".join),
)
texts = st.one_of(
    st.sampled_from(VALUES),
    st.text(max_size=20),
    st.tuples(st.sampled_from(TAGS), st.text(max_size=8)).map(" ".join),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)
assignments = st.one_of(
    field_values.map(lambda kv: f"{kv[0]}={yaml.safe_dump(kv[1], default_flow_style=True)}"),
    st.tuples(keys, st.sampled_from(["=", "==", " = "]), texts).map("".join),
    keys,  # no `=`
    st.text(max_size=20),
)


def check_overrides(workdir: Path, overrides: list[str]) -> None:
    path = workdir / "experiment.yaml"
    path.write_text(yaml.safe_dump(BASE))

    def names_input(message: str) -> bool:
        return message.startswith(("--set ", f"{path}: "))

    # `--set=A`, not `--set A`: argparse would take an A that starts with "-" for an option.
    argv = ["validate", str(path), *(f"--set={a}" for a in overrides)]
    result = fuzz_cli(argv, workdir, [path], names_input)
    if any(a.partition("=")[2].lstrip().startswith("!!python/") for a in overrides):
        assert result.code == 2  # safe_load refuses every Python tag
    if result.code == 0:
        assert result.out == f"{path}: ok\n"
        assert_sane_numbers(load_config(path, overrides).to_dict())


@settings(FAST, max_examples=300)
@given(overrides=st.lists(assignments, min_size=1, max_size=3))
# What the fuzzer found before the fix:
@example(overrides=["client.weight_decay=.nan"])  # accepted
@example(overrides=["client.batch_size=9223372036854775808"])  # accepted, overflows int64
@example(overrides=["client.backend=!!float"])  # IndexError inside PyYAML
@example(overrides=["client.backend=2020-13-45"])  # ValueError inside PyYAML
@example(overrides=["0=\x1f"])  # ReaderError: a two-line message
@example(overrides=["client..lr=1"])  # an empty key part
@example(overrides=["eval.judge.base_url==!!python/object:os.system "])  # a string: "=!!python..."
def test_set_survives_random_assignments(workdir: Path, overrides: list[str]) -> None:
    check_overrides(workdir, overrides)


@pytest.mark.slow
@settings(LONG, max_examples=5000)
@given(overrides=st.lists(assignments, min_size=1, max_size=3))
def test_set_survives_random_assignments_long(workdir: Path, overrides: list[str]) -> None:
    check_overrides(workdir, overrides)


def test_python_tags_are_refused_and_run_nothing(workdir: Path) -> None:
    path = workdir / "experiment.yaml"
    path.write_text(yaml.safe_dump(BASE))
    result = fuzz_cli(
        ["validate", str(path), "--set", "run.name=!!python/object/apply:os.system ['touch x']"],
        workdir,
        [path],
        lambda message: message.startswith("--set run.name: value"),
    )
    assert result.code == 2 and "could not determine a constructor" in result.err
