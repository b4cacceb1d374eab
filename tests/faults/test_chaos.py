"""Chaos: a 10-round run while random workers are SIGKILLed at random times, for several seeds;
every run must end with the uninterrupted run's final adapter."""

import json
import os
import random
import signal
import time

import pytest

from tests.conftest import assert_same_run_files, tiny_experiment
from tests.faults.conftest import (
    SLOW_CLIENTS,
    BackgroundRun,
    pid_of,
    round_info,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROUNDS = 10


def _live_worker_pids(run_dir) -> list[int]:
    latest = (run_dir / "latest").read_text().strip() if (run_dir / "latest").exists() else None
    if latest is None:
        return []
    info = round_info(run_dir, int(latest.removeprefix("round_")))
    return sorted({pid_of(c["worker"]) for c in info["client_results"] if c["worker"]})


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_worker_kills_do_not_change_the_result(reference, tmp_path, seed):
    rng = random.Random(seed)
    raw = tiny_experiment(tmp_path, run={"rounds": ROUNDS}, client=SLOW_CLIENTS)
    raw["cluster"].update(max_client_retries=5, max_worker_restarts=50)
    run = BackgroundRun(raw)
    killed = 0
    while run._thread.is_alive():
        time.sleep(rng.uniform(0.5, 3.0))
        pids = [p for p in _live_worker_pids(run.run_dir) if os.path.exists(f"/proc/{p}")]
        if pids and run._thread.is_alive():
            os.kill(rng.choice(pids), signal.SIGKILL)
            killed += 1
    result = run.join()

    assert result.last_round == ROUNDS
    retries = sum(
        c["attempts"] - 1
        for r in range(1, ROUNDS + 1)
        for c in round_info(run.run_dir, r)["client_results"]
    )
    print(json.dumps({"seed": seed, "workers_killed": killed, "client_retries": retries}))
    assert killed >= 3
    assert_same_run_files(reference(ROUNDS).run_dir, run.run_dir, range(1, ROUNDS + 1))
