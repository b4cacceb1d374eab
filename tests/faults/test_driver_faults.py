"""The driver process killed (SIGKILL) or interrupted (Ctrl-C) while it runs."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from fedsim.config import config_from_dict
from fedsim.driver import run_experiment
from tests.faults.conftest import SLOW_CLIENTS, adapter, assert_same_adapter, wait_for_round

pytestmark = pytest.mark.ray


def _start_cli(config: Path, ray_tmp: str) -> subprocess.Popen:
    # RAY_TMPDIR gives this run's Ray processes a folder of their own, so the test can tell
    # whether any of them outlived the driver.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
    cmd = [sys.executable, "-m", "fedsim.cli", "run", str(config)]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


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


def test_driver_killed_mid_round_then_resumed(reference, experiment_file, tmp_path):
    config = experiment_file(run={"rounds": 3}, client=SLOW_CLIENTS)
    run_dir = tmp_path / "runs" / "t"
    ray_tmp = tempfile.mkdtemp(prefix="fsk", dir="/tmp")
    proc = _start_cli(config, ray_tmp)
    wait_for_round(run_dir, 1, timeout=180)
    time.sleep(0.5)  # round 2 is training
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in _wait_until_gone(ray_tmp, 10):  # SIGKILL leaves Ray no chance to clean up
        os.kill(pid, signal.SIGKILL)

    raw = yaml.safe_load(config.read_text())
    messages: list[str] = []
    result = run_experiment(
        config_from_dict(raw), resume=True, log=messages.append, show_progress=False
    )
    assert result.first_round in (2, 3) and result.last_round == 3
    assert_same_adapter(adapter(reference(3).run_dir, 3), adapter(run_dir, 3))


def test_ctrl_c_stops_within_seconds_leaves_no_ray_process_and_resumes(
    reference, experiment_file, tmp_path
):
    config = experiment_file(run={"rounds": 3}, client=SLOW_CLIENTS)
    run_dir = tmp_path / "runs" / "t"
    ray_tmp = tempfile.mkdtemp(prefix="fsc", dir="/tmp")
    proc = _start_cli(config, ray_tmp)
    wait_for_round(run_dir, 1, timeout=180)
    assert _ray_processes(ray_tmp), "the run's Ray processes were not found"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    stopped_after = time.monotonic() - start
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")

    assert proc.returncode == 130, output
    assert f"fedsim run {config} --resume" in output
    assert stopped_after < 15, f"took {stopped_after:.1f} s to stop"
    assert _wait_until_gone(ray_tmp, 10) == []
    # what the printed command does, on this session's Ray (the CLI adds only argument parsing)
    raw = yaml.safe_load(config.read_text())
    result = run_experiment(config_from_dict(raw), resume=True, log=lambda _: None)
    assert result.last_round == 3 and result.first_round in (2, 3)
    assert_same_adapter(adapter(reference(3).run_dir, 3), adapter(run_dir, 3))
