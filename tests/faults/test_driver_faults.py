"""The driver process killed (SIGKILL) or interrupted (Ctrl-C) while it runs."""

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from fedsim.cli import main
from fedsim.config import config_from_dict
from fedsim.driver import RunResult, run_experiment
from fedsim.faults import FAULTS_ENV
from tests.conftest import assert_same_run_files, tiny_experiment

pytestmark = pytest.mark.ray


def _start_cli(config: Path, ray_tmp: str, hold: Path, *extra: str) -> subprocess.Popen:
    """`fedsim run CONFIG` in a child process whose round-2 clients create `hold` and wait there,
    so round 2 can never complete and the test acts on that event, not after a sleep. RAY_TMPDIR
    gives this run's Ray processes a folder of their own, so the test can tell whether any of them
    outlived the driver."""
    faults = json.dumps([{"round": 2, "hold": str(hold)}])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp, FAULTS_ENV: faults}
    cmd = [sys.executable, "-m", "fedsim.cli", "run", str(config), *extra]
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell that runs the tests in the background ignores SIGINT, and the child would
        # inherit that: give it Ctrl-C's default behaviour, as in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_mid_round_two(run_dir: Path, hold: Path, proc: subprocess.Popen) -> None:
    """Until round 1 is durable (`latest`) and a round-2 client is holding."""
    deadline = time.monotonic() + 180
    while not (hold.exists() and (run_dir / "latest").exists()):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "round 2 never started"
        time.sleep(0.05)
    assert (run_dir / "latest").read_text() == "round_0001\n"


def _ray_processes(ray_tmp: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if ray_tmp.encode() in cmdline:
            found.append(int(pid))
    return found


def _wait_until_gone(ray_tmp: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _ray_processes(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def sigkill_driver_mid_round_two(config: Path, run_dir: Path, tmp: Path) -> None:
    """Start `fedsim run CONFIG` as a child process, SIGKILL it while round 2 trains, and kill
    the Ray processes it leaves behind (SIGKILL gives Ray no chance to clean up)."""
    hold = tmp / "round2-reached"
    ray_tmp = tempfile.mkdtemp(prefix="fsk", dir="/tmp")
    proc = _start_cli(config, ray_tmp, hold)
    _wait_mid_round_two(run_dir, hold, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in _wait_until_gone(ray_tmp, 10):
        os.kill(pid, signal.SIGKILL)


def _uninterrupted(tmp: Path, **sections: dict) -> RunResult:
    cfg = config_from_dict(tiny_experiment(tmp, **sections))
    return run_experiment(cfg, log=lambda _: None, show_progress=False)


STATEFUL = {
    "fedadam": {"server": {"strategy": "fedadam", "lr": 0.01}},
    "scaffold": {"server": {"strategy": "scaffold"}},
}


@pytest.mark.parametrize(
    "strategy",
    # SCAFFOLD has server and client state; fedadam's moments are also resumed bitwise in
    # tests/test_algorithms.py by default, and killed with the driver in the slow tier.
    [pytest.param("fedadam", marks=pytest.mark.slow), "scaffold"],
)
def test_driver_killed_mid_round_then_resumed_byte_identical(
    ray_local, experiment_file, tmp_path, strategy
):
    """A strategy with server state (fedadam's moments) or client state (SCAFFOLD's variates):
    SIGKILL of the driver mid-round 2, then --resume: every file of every round, and every
    client-state file, is byte-identical to an uninterrupted run's."""
    sections = {"run": {"rounds": 3}, **STATEFUL[strategy]}
    reference = _uninterrupted(tmp_path / "reference", **sections)
    config = experiment_file(**sections)
    run_dir = tmp_path / "runs" / "t"
    sigkill_driver_mid_round_two(config, run_dir, tmp_path)

    cfg = config_from_dict(yaml.safe_load(config.read_text()))
    result = run_experiment(cfg, resume=True, log=lambda _: None, show_progress=False)
    assert (result.first_round, result.last_round) == (2, 3)
    assert_same_run_files(reference.run_dir, run_dir, [1, 2, 3])
    assert (run_dir / "rounds/round_0003/server_state.safetensors").is_file()
    assert any((run_dir / "clients").glob("*.safetensors")) == (strategy == "scaffold")


def test_ctrl_c_stops_within_seconds_leaves_no_ray_process_and_prints_the_resume_command(
    ray_local, experiment_file, tmp_path
):
    reference = _uninterrupted(tmp_path / "reference", run={"rounds": 3})
    config = experiment_file(run={"rounds": 2})
    run_dir, hold = tmp_path / "runs" / "t", tmp_path / "round2-reached"
    ray_tmp = tempfile.mkdtemp(prefix="fsc", dir="/tmp")
    # an override the resume command must repeat, or it would resume another experiment
    proc = _start_cli(config, ray_tmp, hold, "--set", "run.rounds=3")
    _wait_mid_round_two(run_dir, hold, proc)
    assert _ray_processes(ray_tmp), "the run's Ray processes were not found"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    stopped_after = time.monotonic() - start

    assert proc.returncode == 130, output
    assert stopped_after < 15, f"took {stopped_after:.1f} s to stop"
    assert _wait_until_gone(ray_tmp, 10) == []
    printed = output.rsplit("interrupted; continue with: ", 1)[1].splitlines()[0]
    words = shlex.split(printed)
    assert words == ["fedsim", "run", str(config), "--set", "run.rounds=3", "--resume"]
    # run what was printed (in this process, on this session's Ray; the CLI adds only parsing)
    assert main(words[1:]) == 0
    assert_same_run_files(reference.run_dir, run_dir, [1, 2, 3])
