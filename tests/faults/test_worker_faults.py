"""A worker process killed mid-round, a client whose training raises, the aggregator killed."""

import json
import time
from pathlib import Path

import pytest

from fedsim.config import config_from_dict
from fedsim.driver import run_experiment
from fedsim.faults import FAULTS_ENV
from tests.conftest import assert_same_run_files, tiny_experiment
from tests.faults.conftest import (
    SLOW_CLIENTS,
    BackgroundRun,
    kill,
    pid_of,
    round_info,
    wait_for_round,
)

pytestmark = pytest.mark.ray


def _holding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make one round-2 client hold mid-turn (fedsim.faults) until the returned file, which
    holds its worker's pid, is removed."""
    hold = tmp_path / "holding"
    fault = {"round": 2, "hold": str(hold), "once_file": str(tmp_path / "held")}
    monkeypatch.setenv(FAULTS_ENV, json.dumps([fault]))
    return hold


def _wait_for_pid(hold: Path, run: BackgroundRun) -> int:
    deadline = time.monotonic() + 180
    while not hold.exists():
        assert run.error is None and time.monotonic() < deadline, run.messages
        time.sleep(0.05)
    return int(hold.read_text())


def test_worker_killed_mid_round_is_replaced_and_its_client_retried(
    reference, monkeypatch, tmp_path
):
    hold = _holding(tmp_path, monkeypatch)
    run = BackgroundRun(tiny_experiment(tmp_path, run={"rounds": 3}, client=SLOW_CLIENTS))
    kill(_wait_for_pid(hold, run))  # its worker, mid-turn in round 2
    result = run.join()

    assert result.last_round == 3
    retried = [
        (r, c) for r in (1, 2, 3) for c in round_info(run.run_dir, r)["client_results"]
        if c["attempts"] > 1
    ]  # fmt: skip
    # The held client's worker died in round 2: it was retried there and trained. (A restarted
    # worker's first task in the next round can meet ActorUnavailableError once more; it is
    # retried like any other.)
    assert retried and retried[0][0] == 2, retried
    assert all(c["ok"] and c["attempts"] == 2 for _, c in retried), retried
    assert any("its worker died" in m and "retry 1" in m for m in run.messages)
    assert_same_run_files(reference(3).run_dir, run.run_dir, [1, 2, 3])


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


def test_aggregator_killed_mid_round_redoes_the_round(reference, monkeypatch, tmp_path):
    hold = _holding(tmp_path, monkeypatch)
    run = BackgroundRun(tiny_experiment(tmp_path, run={"rounds": 3}, client=SLOW_CLIENTS))
    _wait_for_pid(hold, run)  # round 2 is training, round 1 is folded and handed to the writer
    wait_for_round(run.run_dir, 1)
    kill(pid_of(round_info(run.run_dir, 1)["aggregator"]))
    hold.unlink()  # the held client finishes and uploads to an aggregator that is gone
    result = run.join()

    assert result.last_round == 3
    redone = [m for m in run.messages if "the aggregator failed" in m]
    assert len(redone) == 1 and redone[0].startswith("round 2:"), run.messages
    assert "redoing the round from round 2 on" in redone[0]
    assert_same_run_files(reference(3).run_dir, run.run_dir, [1, 2, 3])


def test_aggregator_dying_while_handing_out_contexts_loses_no_worker(
    reference, monkeypatch, tmp_path
):
    # Every client task of round 3 gets an input (its context) that the dead aggregator never
    # computed. Ray reports that as the task's failure, with the aggregator's actor error inside:
    # the workers are fine, so none may be given up, and the round is redone, not run empty.
    fault = {"round": 3, "aggregator": "exit_in_client_context", "once_file": str(tmp_path / "x")}
    monkeypatch.setenv(FAULTS_ENV, json.dumps([fault]))
    raw = tiny_experiment(tmp_path, run={"rounds": 3}, client=SLOW_CLIENTS)
    messages: list[str] = []
    result = run_experiment(config_from_dict(raw), log=messages.append, show_progress=False)

    assert not [m for m in messages if "gone for good" in m or "no live worker" in m], messages
    redone = [m for m in messages if "the aggregator failed" in m]
    assert len(redone) == 1 and redone[0].startswith("round 3:"), messages
    assert "an input of client" in redone[0]
    assert [m["round"] for m in result.metrics] == [1, 2, 3]
    assert_same_run_files(reference(3).run_dir, result.run_dir, [1, 2, 3])


# In about 1 of 4 runs the aggregator dies before round 3's contexts are all computed, which the
# pool once took for the death of every worker (round 3 then ran empty); the test above makes
# that case certain. This one is slow because of its timing-dependent path, not a known bug.
@pytest.mark.slow
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
    # it dies once round 3 has begun (fedsim.faults waits for that event)
    redone = [m for m in messages if "the aggregator failed" in m]
    assert len(redone) == 1 and redone[0].startswith("round 3:"), messages
    assert "redoing the rounds from round 2 on" in redone[0]
    assert (
        round_info(result.run_dir, 1)["aggregator"] != round_info(result.run_dir, 2)["aggregator"]
    )
    assert_same_run_files(reference(3).run_dir, result.run_dir, [1, 2, 3])


def _selected(raw: dict, round_idx: int) -> list[int]:
    from fedsim.server.selection import select_clients

    cfg = config_from_dict(raw)
    return select_clients(
        cfg.run.seed, round_idx, cfg.data.num_clients, cfg.server.clients_per_round
    )
