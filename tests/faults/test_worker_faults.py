"""A worker process killed mid-round, a client whose training raises, the aggregator killed."""

import json
import re

import pytest

from fedsim.config import config_from_dict
from fedsim.driver import run_experiment
from fedsim.faults import FAULTS_ENV
from tests.conftest import tiny_experiment
from tests.faults.conftest import (
    SLOW_CLIENTS,
    BackgroundRun,
    adapter,
    assert_same_adapter,
    kill,
    pid_of,
    round_info,
    wait_for_round,
)

pytestmark = pytest.mark.ray


def test_worker_killed_mid_round_is_replaced_and_its_client_retried(reference, tmp_path):
    run = BackgroundRun(tiny_experiment(tmp_path, run={"rounds": 3}, client=SLOW_CLIENTS))
    wait_for_round(run.run_dir, 1)
    victim = pid_of(round_info(run.run_dir, 1)["client_results"][0]["worker"])
    kill(victim)  # round 2 is training now: the victim dies mid-turn
    result = run.join()

    assert result.last_round == 3
    retried = [
        c for r in (2, 3) for c in round_info(run.run_dir, r)["client_results"] if c["attempts"] > 1
    ]
    assert retried, "no client was retried after its worker was killed"
    assert all(c["ok"] for c in retried), "\n".join([str(retried), *run.messages])
    assert any("its worker died" in m and "retry 1" in m for m in run.messages)
    assert_same_adapter(adapter(reference(3).run_dir, 3), adapter(run.run_dir, 3))


def test_a_client_that_raises_is_dropped_and_the_run_goes_on(ray_local, monkeypatch, tmp_path):
    raw = tiny_experiment(tmp_path, run={"rounds": 2})
    victim = json.loads(json.dumps(_selected(raw, round_idx=2)))[0]
    monkeypatch.setenv(FAULTS_ENV, json.dumps([{"round": 2, "client": victim}]))
    messages: list[str] = []
    result = run_experiment(config_from_dict(raw), log=messages.append, show_progress=False)

    assert result.last_round == 2
    info = round_info(result.run_dir, 2)
    failed = [c for c in info["client_results"] if not c["ok"]]
    assert [c["client"] for c in failed] == [victim]
    assert "RuntimeError: injected fault" in failed[0]["error"]
    assert victim not in info["aggregation"]["accepted"]
    assert str(victim) not in info["aggregation"]["weights"]  # renormalised over the rest
    assert info["num_failed"] == 1 and len(info["aggregation"]["accepted"]) == 2
    log = "\n".join(messages)
    assert f"client {victim} failed in round 2:\nTraceback" in log
    assert f"1 failed (client {victim}: RuntimeError" in log


def test_aggregator_killed_mid_round_redoes_the_round(reference, tmp_path):
    run = BackgroundRun(tiny_experiment(tmp_path, run={"rounds": 3}, client=SLOW_CLIENTS))
    wait_for_round(run.run_dir, 1)
    kill(pid_of(round_info(run.run_dir, 1)["aggregator"]))
    result = run.join()

    assert result.last_round == 3
    assert any("the aggregator failed" in m and "redoing the round" in m for m in run.messages)
    for r in (1, 2, 3):
        assert_same_adapter(adapter(reference(3).run_dir, r), adapter(run.run_dir, r))


def test_aggregator_dying_before_a_background_checkpoint_redoes_the_lost_round(
    reference, monkeypatch, tmp_path
):
    # round 2 is trained and aggregated, then its aggregator dies before writing it: round 2
    # exists nowhere but in the dead process, so rounds 2 and 3 are redone from round 1's files
    fault = {"round": 2, "aggregator": "exit_before_checkpoint", "once_file": str(tmp_path / "x")}
    monkeypatch.setenv(FAULTS_ENV, json.dumps([fault]))
    raw = tiny_experiment(tmp_path, run={"rounds": 3}, client=SLOW_CLIENTS)
    messages: list[str] = []
    result = run_experiment(config_from_dict(raw), log=messages.append, show_progress=False)

    assert result.last_round == 3
    assert [m["round"] for m in result.metrics] == [1, 2, 3]  # one line per durable round
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]
    # it dies while round 3 starts (or, on a slow machine, just before round 2 returned)
    assert any(re.search("redoing the rounds? from round 2 on", m) for m in messages), messages
    assert (
        round_info(result.run_dir, 1)["aggregator"] != round_info(result.run_dir, 2)["aggregator"]
    )
    for r in (1, 2, 3):
        assert_same_adapter(adapter(reference(3).run_dir, r), adapter(result.run_dir, r))


def _selected(raw: dict, round_idx: int) -> list[int]:
    from fedsim.server.selection import select_clients

    cfg = config_from_dict(raw)
    return select_clients(
        cfg.run.seed, round_idx, cfg.data.num_clients, cfg.server.clients_per_round
    )
