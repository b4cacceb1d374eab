"""Fault-injection tests: real processes are killed, real writes fail; each test checks that the
run completes with the adapters an uninterrupted run produces."""

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsim.config import config_from_dict
from fedsim.driver import RunResult, run_experiment
from tests.conftest import tiny_experiment

SLOW_CLIENTS = {"local_steps": 40}
"""Clients that train for about a second, so that a kill lands mid-turn."""


def round_info(run_dir: Path, round_idx: int) -> dict:
    return json.loads((run_dir / f"rounds/round_{round_idx:04d}/round.json").read_text())


def pid_of(address: str) -> int:
    """The pid in a `host:pid` worker or aggregator address from round.json."""
    return int(address.rsplit(":", 1)[1])


def wait_for_round(run_dir: Path, round_idx: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    latest = run_dir / "latest"
    while not (latest.exists() and latest.read_text().strip() >= f"round_{round_idx:04d}"):
        assert time.monotonic() < deadline, f"round {round_idx} never completed"
        time.sleep(0.05)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


class BackgroundRun:
    """`run_experiment` in a thread, so the test can break things while it runs."""

    def __init__(self, raw: dict) -> None:
        self.cfg = config_from_dict(raw)
        self.messages: list[str] = []
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = run_experiment(self.cfg, log=self.messages.append, show_progress=False)
        except BaseException as err:  # surfaced by join()
            self.error = err

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def join(self, timeout: float = 300) -> RunResult:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the run hung"
        if self.error:
            raise self.error
        assert self.result is not None
        return self.result


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory) -> Callable[..., RunResult]:
    """Uninterrupted runs of the slow-client tiny experiment, by number of rounds (cached)."""
    cache: dict[int, RunResult] = {}

    def get(rounds: int = 3) -> RunResult:
        if rounds not in cache:
            tmp = tmp_path_factory.mktemp(f"reference{rounds}")
            raw = tiny_experiment(tmp, run={"rounds": rounds}, client=SLOW_CLIENTS)
            cache[rounds] = run_experiment(
                config_from_dict(raw), log=lambda _: None, show_progress=False
            )
        return cache[rounds]

    return get
