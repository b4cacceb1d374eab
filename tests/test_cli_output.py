"""What the command line prints: a real `fedsim run` in a child process (not a terminal) prints
only fedsim's own lines and ends with the next commands; `--verbose` lets the libraries' logs
through; a torch-backend run never imports DeepSpeed, in the driver or in any Ray worker, and
the driver never imports torch, transformers or peft; each
command's help is written for users, with an example.

The line shapes below are an allowlist: a new line from Ray, DeepSpeed or transformers (or a new
line of fedsim's that nobody looked at) fails the test until it is silenced or added here.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from fedsim.cli import COMMANDS, build_parser
from tests.conftest import tiny_experiment

FEDSIM_LINES = [
    r"fedsim: tiny model cache hit \S+",
    r"fedsim: building tiny model \(.*\) in \S+",
    r"fedsim: built tiny model in [\d.]+ s \(loss [\d.]+ -> [\d.]+, [\d,]+ parameters\)",
    r"shards: \d+ blocks of \d+ clients in \S+, tokenised as the rounds need them",
    r"warning: shard block \d+: \d+ of \d+ records lose their whole response to "
    r"data\.cutoff_len=\d+; they add nothing to training",
    r"run \S+: \d+ clients, \d+ per round, \d+ workers, rounds \d+\.\.\d+",
    r"round +\d+/\d+ \| clients \d+ \| samples \d+ \| train loss [\d.]+ \| [\d.]+ s(?: \| .+)?",
    r"done: \S+ \(latest round \d+\)",
    r"next:",
    r"  fedsim (?:eval|report|run) .+  # .+",
]
"""Every line a plain run may print (the header, the round lines, the next commands, ...)."""
FEDSIM_LINE = re.compile("|".join(f"(?:{shape})" for shape in FEDSIM_LINES))

# Imported in every process of the run; records which processes import `WATCHED` (by pid, with
# their command line) without changing what they import. It reaches the Ray workers through
# PYTHONPATH, which they inherit from the driver.
IMPORT_WATCH = textwrap.dedent(
    """
    import importlib.machinery, os, sys

    WATCHED = ("deepspeed", "peft", "torch", "transformers")

    class _Recorded:
        def __init__(self, name, loader):
            self.name, self.loader = name, loader

        def create_module(self, spec):
            return self.loader.create_module(spec)

        def exec_module(self, module):  # only a real import runs the module (not find_spec)
            out = os.path.join(os.environ["IMPORT_WATCH_DIR"], f"{self.name}.{os.getpid()}")
            with open(out, "w") as f:
                f.write(" ".join(sys.argv))
            return self.loader.exec_module(module)

    class _Watch:
        def find_spec(self, name, path=None, target=None):
            if name not in WATCHED or "IMPORT_WATCH_DIR" not in os.environ:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None:
                spec.loader = _Recorded(name, spec.loader)
            return spec

    sys.meta_path.insert(0, _Watch())
    """
)


def imports_of(watch_dir: Path, module: str) -> list[str]:
    """The command lines of the processes that imported `module`."""
    return [p.read_text() for p in sorted(watch_dir.glob(f"{module}.*"))]


def records_with_long_ones(path: Path) -> Path:
    """120 short records of 4 categories, every third with a context far longer than the tiny
    model's 256 positions: the tokenizer would warn about them (transformers' 'Token indices
    sequence length is longer than the specified maximum'), and they lose their response to
    data.cutoff_len, which fedsim says in its own words."""
    lines = []
    for i in range(120):
        context = " ".join(f"w{i}x{j}" for j in range(300)) if i % 3 == 0 else ""
        record = {"instruction": f"Repeat {i}.", "context": context, "response": f"{i}"}
        lines.append(json.dumps({**record, "category": "abcd"[i % 4]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path, str]:
    """`fedsim run` on a tiny experiment (with long records) in a child process whose output is a
    pipe, as in CI or `| cat`; returns the finished process, the folder of import records and
    the Ray instance's temporary folder."""
    source = records_with_long_ones(tmp_path / "records.jsonl")
    config = tmp_path / "experiment.yaml"
    raw = tiny_experiment(tmp_path, data={"source": str(source)})
    config.write_text(yaml.safe_dump(raw))
    hook, watch = tmp_path / "hook", tmp_path / "imports"
    hook.mkdir(exist_ok=True)
    watch.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(IMPORT_WATCH)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FEDSIM_VERBOSE")}
    path = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    env.update(PYTHONPATH=path, IMPORT_WATCH_DIR=str(watch), PYTHONUNBUFFERED="1")
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="fso", dir="/tmp")  # short: Ray's socket paths
    fedsim = Path(sys.executable).parent / "fedsim"  # the console script, as a user runs it
    result = subprocess.run(
        [str(fedsim), "run", str(config), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, watch, env["RAY_TMPDIR"]


def ray_processes_of(ray_tmp: str) -> list[int]:
    """Processes of the Ray instance whose temporary folder is `ray_tmp`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if ray_tmp.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
    return found


@pytest.mark.ray
def test_a_run_prints_only_fedsim_lines_ends_with_the_next_commands_and_imports_only_what_it_uses(
    tmp_path,
):
    # one round on one worker: the least Ray time that still has a worker train a client
    result, watch, ray_tmp = run_cli(
        tmp_path, "--set", "run.rounds=1", "--set", "cluster.num_workers=1"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # the local Ray instance ended with the driver (fast exit, execution.end_process)
    deadline = time.monotonic() + 5
    while ray_processes_of(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_processes_of(ray_tmp) == []
    strangers = [line for line in output.splitlines() if not FEDSIM_LINE.fullmatch(line)]
    assert strangers == [], f"lines that are not fedsim's own:\n{output}"
    assert "records lose their whole response" in output  # the long records, in fedsim's words

    lines = result.stdout.splitlines()
    assert [line[:9] for line in lines if line.startswith("round ")] == ["round   1"]
    run_dir = tmp_path / "runs" / "t"
    nxt = lines[lines.index("next:") + 1 :]
    commands = [shlex.split(line.split("  # ")[0]) for line in nxt]
    config = str(tmp_path / "experiment.yaml")
    resume = ["--set", "cluster.num_workers=1", "--set", "run.rounds=11", "--resume"]
    assert commands == [
        ["fedsim", "eval", str(run_dir)],
        ["fedsim", "report", str(run_dir)],
        ["fedsim", "run", config, *resume],
    ]
    assert lines[lines.index("next:") - 1] == f"done: {run_dir} (latest round 1)"

    # The import records reach the workers (every worker imports torch, transformers and peft;
    # the aggregator torch); deepspeed is imported by none of them, and the driver (the `fedsim
    # run` process), which only schedules and tokenises, imports none of the four.
    assert any("default_worker.py" in cmd for cmd in imports_of(watch, "peft")), list(
        watch.iterdir()
    )
    assert imports_of(watch, "deepspeed") == []
    for module in ("torch", "transformers", "peft"):
        assert [cmd for cmd in imports_of(watch, module) if " run " in cmd] == [], module


@pytest.mark.ray
@pytest.mark.slow  # a second Ray start; the quiet run above is the default tier's
def test_verbose_lets_the_libraries_logs_through(tmp_path):
    result, _, _ = run_cli(tmp_path, "--set", "run.rounds=1", "--verbose")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    strangers = [line for line in output.splitlines() if not FEDSIM_LINE.fullmatch(line)]
    assert any("Started a local Ray instance" in line for line in strangers), output
    assert any("Token indices sequence length is longer" in line for line in strangers), output
    assert "next:" in result.stdout


# --- help ------------------------------------------------------------------------------------


def help_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """What `fedsim ARGV... --help` prints (it exits 0)."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_speaks_to_users_and_shows_where_to_start(capsys):
    text = help_text(capsys)
    assert "dispatch table" not in text and "plain function" not in text
    assert "fedsim run experiments/quickstart.yaml" in text
    for name in COMMANDS:
        assert re.search(rf"^    {name}\b", text, re.M), f"{name} is not listed"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_help_has_an_example_that_parses(capsys, name):
    text = help_text(capsys, name)
    assert "--verbose" in text
    examples = text.split("example:\n" if "example:\n" in text else "examples:\n", 1)[1]
    commands = [shlex.split(line) for line in examples.splitlines() if line.strip()]
    assert commands and all(words[:2] == ["fedsim", name] for words in commands), examples
    for words in commands:  # each example is a valid command line for this command
        assert build_parser().parse_args(words[1:]).command == name


# --- Ray's warnings in fedsim's words ---------------------------------------------------------


def test_a_ray_warning_the_user_can_act_on_is_said_in_fedsim_words(monkeypatch, capsys, tmp_path):
    """Ray's real /dev/shm warning (its own code, on a machine whose /dev/shm is made to look
    small), reaching the "ray" logger's handlers (two console handlers here, standing in for
    Ray's): quiet, fedsim's line is printed once instead and Ray's lines below errors are
    dropped; verbose, Ray's own line reaches the handlers."""
    import ray._private.services as services
    import ray._private.utils

    from fedsim.execution import quiet_ray_logger

    monkeypatch.setattr(ray._private.utils, "get_shared_memory_bytes", lambda: 64 * 2**20)
    consoles = [io.StringIO(), io.StringIO()]
    ray_logger = logging.getLogger("ray")
    monkeypatch.setattr(ray_logger, "handlers", [logging.StreamHandler(c) for c in consoles])
    monkeypatch.setattr(ray_logger, "propagate", False)
    monkeypatch.setattr(ray_logger, "level", logging.INFO)  # as ray.init leaves it, verbose
    try:
        quiet_ray_logger(True)
        services.determine_plasma_store_config(2 * 10**9, str(tmp_path))
        ray_logger.info("Started a local Ray instance.")
        quiet = capsys.readouterr().err.splitlines()
        assert [c.getvalue() for c in consoles] == ["", ""]
        quiet_ray_logger(False)
        services.determine_plasma_store_config(2 * 10**9, str(tmp_path))
    finally:
        quiet_ray_logger(False)
    assert quiet == [
        f"fedsim: warning: Ray keeps its object store in {tmp_path}, on disk, because "
        "/dev/shm has only 64 MB free: adapters and shards move between processes more slowly; "
        "in Docker, start the container with --shm-size=2.05gb"
    ]
    assert capsys.readouterr().err == ""
    for console in consoles:
        assert "instead of /dev/shm because /dev/shm has only 67108864 bytes" in console.getvalue()
