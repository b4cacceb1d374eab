"""What every fuzzer checks: the CLI's bad-input contract, and that nothing was written.

The contract (fedsim/cli.py): a run of `fedsim ...` on bad input exits 2 with one
`fedsim: error: ...` line per problem on stderr, each naming the field or file, before anything
is written; any other outcome than exit 0 or that (an exception, a traceback, exit 1) is a bug.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Callable, Collection
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis.control import currently_in_test_context

from fedsim.cli import main

ERROR = "fedsim: error: "

# The default run: a fixed example sequence (reproducible in CI, no seed or profile to pass) and
# no example database, which would write .hypothesis/ into the working tree.
FAST = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one temp dir for all examples, compared each time
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
# `-m slow`: fresh random examples each run; a failure prints the seed that reproduces it.
LONG = settings(FAST, derandomize=False, print_blob=True)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(argv: list[str]) -> CliResult:
    """`fedsim ARGV` in-process; any exception propagates and fails the example."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return CliResult(code, out.getvalue(), err.getvalue())


def snapshot(root: Path, skip: Collection[Path]) -> dict[str, bytes | None]:
    """Every path under `root` except `skip` (the fuzzer's own inputs), with each file's bytes."""
    tree: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path not in skip:
                tree[str(path.relative_to(root))] = path.read_bytes() if path.is_file() else None
    return tree


def check_contract(result: CliResult, names_input: Callable[[str], bool]) -> None:
    """Exit 0, or exit 2 with only `fedsim: error:` lines that each name the field or file
    (`names_input(message)`)."""
    assert "Traceback" not in result.err, result.err
    assert result.code in (0, 2), (result.code, result.err)
    if result.code == 0:
        assert result.err == "", result.err
        return
    lines = result.err.splitlines()
    assert lines, "exit 2 without an error line"
    for line in lines:
        assert line.startswith(ERROR), result.err
        message = line.removeprefix(ERROR)
        assert names_input(message), f"names no field or file: {message!r}"


def fuzz_cli(
    argv: list[str], workdir: Path, inputs: Collection[Path], names_input: Callable[[str], bool]
) -> CliResult:
    """Run the CLI, check the contract, and check that nothing under `workdir` changed except
    the `inputs` files."""
    before = snapshot(workdir, inputs)
    ray_before = "ray" in sys.modules
    result = run_cli(argv)
    # validate and partition never need Ray (importing it is the first step to starting it)
    assert ray_before or "ray" not in sys.modules, "the command imported ray"
    if currently_in_test_context():  # --hypothesis-show-statistics: how many were valid
        event(f"exit {result.code}")
    check_contract(result, names_input)
    assert snapshot(workdir, inputs) == before, "the command wrote files"
    return result


def assert_sane_numbers(tree: object, where: str = "") -> None:
    """Every number in an accepted config is finite and fits in int64 (what torch takes)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            assert_sane_numbers(value, f"{where}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            assert_sane_numbers(value, f"{where}[{i}]")
    elif isinstance(tree, float):
        assert math.isfinite(tree), f"{where} = {tree} was accepted"
    elif isinstance(tree, int):
        assert -(2**63) <= tree < 2**63, f"{where} = {tree} was accepted"
