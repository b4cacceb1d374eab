"""A worker takes a batch of clients per Ray task (fedsim.execution.WorkerPool): the batch sizes,
and that batching changes no bit of a run."""

from __future__ import annotations

import pytest

from fedsim.config import config_from_dict
from fedsim.driver import run_experiment
from fedsim.execution import WorkerPool
from tests.conftest import assert_same_run_files, tiny_experiment


def _pool(workers: int, max_batch: int = 16) -> WorkerPool:
    pool = WorkerPool.__new__(WorkerPool)  # no actors: batch_size reads the live count only
    pool.alive, pool.max_batch = list(range(workers)), max_batch
    return pool


def test_batches_are_half_a_fair_share_capped_and_shrink_as_the_round_ends() -> None:
    pool = _pool(2)
    sizes, queued = [], 500
    while queued:
        sizes.append(pool.batch_size(queued))
        queued -= sizes[-1]
    assert sizes[:28] == [16] * 28 and sizes[28:] == [13, 10, 8, 6, 4, 3, 2, 2, 1, 1, 1, 1]
    assert sum(sizes) == 500
    assert [pool.batch_size(n) for n in (1, 3, 4, 5, 64, 65)] == [1, 1, 1, 2, 16, 16]
    assert _pool(4).batch_size(40) == 5 and _pool(2, max_batch=1).batch_size(500) == 1


@pytest.mark.ray
def test_batches_of_clients_give_the_bits_of_one_client_per_task(
    ray_local, tmp_path, monkeypatch
) -> None:
    # 12 clients a round on 2 workers: batches of 3, 2, 2, 1, ... against one client per task
    def run(name: str) -> object:
        raw = tiny_experiment(
            tmp_path / name,
            data={"num_clients": 12, "builtin_records": 240, "partition": {"kind": "iid"}},
            client={"local_steps": 1},
            server={"clients_per_round": 12},
        )
        return run_experiment(config_from_dict(raw), log=lambda _: None, show_progress=False)

    batched = run("batched")
    monkeypatch.setattr(WorkerPool, "max_batch", 1)
    one_by_one = run("one")
    assert_same_run_files(one_by_one.run_dir, batched.run_dir, [1, 2])
