"""`server.mode: async` end to end on Ray, on the three-client schedule of docs/async.md: clients
0, 1, 2 take exactly 3, 5 and 7 simulated seconds, all three always in flight, K = 2.

One module run serves the default tests: the reference (1 worker, 5 server steps,
uninterrupted), then its run directory cut back to step 2 and resumed on 2 workers: the updates in
flight at step 2 are trained again from version 1 (read back from rounds/round_0001), and steps
3 to 5 must come out bit for bit as the reference's. From scratch on 2 workers, and after a
SIGKILL of the driver, are in the slow tier."""

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from fedsim import checkpoint
from fedsim.config import config_from_dict
from fedsim.driver import RunResult, run_experiment
from fedsim.errors import FedsimInputError
from fedsim.faults import FAULTS_ENV
from tests.conftest import assert_same_run_files, tiny_experiment
from tests.faults.test_driver_faults import sigkill_driver_mid_round_two

pytestmark = pytest.mark.ray

STEPS = 5
HAND_WRITTEN = [
    # (simulated clock, [(client, start version, staleness, start, finish), ...]): the table of
    # docs/async.md; at t=15 clients 1 and 0 finish together and 1, dispatched first, goes first
    (5.0, [(0, 0, 0, 0.0, 3.0), (1, 0, 0, 0.0, 5.0)]),
    (7.0, [(0, 0, 1, 3.0, 6.0), (2, 0, 1, 0.0, 7.0)]),
    (10.0, [(0, 1, 1, 6.0, 9.0), (1, 1, 1, 5.0, 10.0)]),
    (14.0, [(0, 2, 1, 9.0, 12.0), (2, 2, 1, 7.0, 14.0)]),
    (15.0, [(1, 3, 1, 10.0, 15.0), (0, 3, 1, 12.0, 15.0)]),
]


def three_clients(tmp: Path, rounds: int = STEPS, workers: int = 2) -> dict:
    """3 local steps of 35 simulated seconds at speeds 35, 21, 15: 3, 5 and 7 s; a bandwidth so
    large that the adapter's transfer adds nothing to those floats, so ties stay ties."""
    profile = tmp / "profile.yaml"
    profile.write_text(yaml.safe_dump({"clients": {0: {"speed": 35}, 1: {"speed": 21},
                                                    2: {"speed": 15}}}))  # fmt: skip
    return tiny_experiment(
        tmp,
        run={"rounds": rounds},
        data={"num_clients": 3},
        client={"local_steps": 3, "profile": str(profile)},
        server={
            "mode": "async",
            "concurrency": 3,
            "buffer_size": 2,
            "clients_per_round": 3,
            "weighting": "uniform",
        },
        system={"enabled": True, "step_seconds": 35.0, "bandwidth_mbps": 1e300},
        cluster={"num_workers": workers, "cpus_per_worker": 1},
    )


def _run(raw: dict, resume: bool = False, **options: bool) -> RunResult:
    return run_experiment(config_from_dict(raw), resume=resume, log=lambda _: None,
                          show_progress=False, **options)  # fmt: skip


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory) -> tuple[Path, RunResult]:
    """(a copy of the reference's run directory, the run resumed after step 2 on 2 workers);
    the reference runs on one worker, which starts faster than two on a busy machine."""
    tmp = tmp_path_factory.mktemp("async")
    reference = _run(three_clients(tmp, workers=1))
    kept = tmp_path_factory.mktemp("async-reference") / "t"
    shutil.copytree(reference.run_dir, kept)
    # the run directory as a run that stopped after step 2 left it (resume truncates metrics)
    for version in range(3, STEPS + 1):
        shutil.rmtree(reference.run_dir / f"rounds/round_{version:04d}")
    checkpoint.point_latest(reference.run_dir, 2)
    resumed = _run(three_clients(tmp), resume=True)
    return kept, resumed


def round_json(run_dir: Path, version: int) -> dict:
    return json.loads((run_dir / f"rounds/round_{version:04d}/round.json").read_text())


def test_two_workers_resumed_mid_stream_give_the_bits_of_one_worker_uninterrupted(runs):
    reference, resumed = runs
    assert (resumed.first_round, resumed.last_round) == (3, STEPS)
    assert_same_run_files(reference, resumed.run_dir, range(1, STEPS + 1))
    for version in range(3, STEPS + 1):  # the same dispatches launched at each step
        launched = round_json(resumed.run_dir, version)["async"]["launched"]
        assert launched == round_json(reference, version)["async"]["launched"]


def test_round_json_records_the_hand_written_schedule(runs):
    reference, _ = runs
    for version, (clock, updates) in enumerate(HAND_WRITTEN, start=1):
        schedule = round_json(reference, version)["async"]
        assert schedule["version"] == version and schedule["simulated_clock"] == clock
        shown = [
            (u["client"], u["start_version"], u["staleness"], u["start_time"], u["finish_time"])
            for u in schedule["updates"]
        ]
        assert shown == updates, f"step {version}"
        assert schedule["wasted"] == [] and schedule["wasted_fraction"] == 0.0
    # all three clients stay in flight: after step 4 (t=14) client 1 still trains from v3
    assert round_json(reference, 4)["async"]["oldest_needed_version"] == 3


def test_staleness_weights_by_hand(runs):
    """Uniform weighting (n_i = 1) and FedBuff's 1/sqrt(1 + s): fold weights 2^30 for a fresh
    update, 2^30/sqrt(2) for one a step stale; c_i = s_i / K."""
    reference, _ = runs
    fresh, stale = 2**30, 759_250_125  # round(2**30 / sqrt(2)) = round(759250124.99)
    assert stale == round(2**30 / math.sqrt(2))
    for version, (_, updates) in enumerate(HAND_WRITTEN, start=1):
        info = round_json(reference, version)
        expected = [fresh if u[2] == 0 else stale for u in updates]
        dispatches = [str(u["dispatch"]) for u in info["async"]["updates"]]
        assert [info["aggregation"]["weights"][d] for d in dispatches] == expected
        coefficients = [u["coefficient"] for u in info["async"]["updates"]]
        by_hand = [1 / 2 if u[2] == 0 else 1 / 2 / math.sqrt(2) for u in updates]
        assert coefficients == pytest.approx(by_hand, rel=1e-15)
        assert info["clients"] == [u[0] for u in updates]


def test_metrics_lines_carry_the_simulated_clock_and_staleness(runs):
    for run_dir in (runs[0], runs[1].run_dir):
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["round"] for x in lines] == list(range(1, STEPS + 1))
        clocks = [clock for clock, _ in HAND_WRITTEN]
        assert [x["simulated_clock"] for x in lines] == clocks
        assert [x["simulated_seconds"] for x in lines] == [5.0, 2.0, 3.0, 4.0, 1.0]
        assert [x["staleness_histogram"] for x in lines] == [{"0": 2}] + [{"1": 2}] * 4
        assert lines[-1]["updates_per_simulated_hour"] == STEPS * 2 * 3600 / 15.0


@pytest.mark.slow
def test_two_workers_from_scratch_give_the_bits_of_one_worker(runs, tmp_path):
    reference, _ = runs
    alone = _run(three_clients(tmp_path))
    assert_same_run_files(reference, alone.run_dir, range(1, STEPS + 1))


@pytest.mark.slow
def test_driver_sigkilled_mid_step_then_resumed_gives_the_same_bits(runs, tmp_path):
    """SIGKILL of `fedsim run` while step 2's dispatches train (step 1 on disk), then --resume:
    the dispatches in flight (from versions 0 and 1) are trained again, and every step's files
    are the reference's."""
    reference, _ = runs
    raw = three_clients(tmp_path)
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / "t"
    sigkill_driver_mid_round_two(config, run_dir, tmp_path)
    assert not (run_dir / "rounds/round_0002").exists()

    resumed = _run(raw, resume=True)
    assert (resumed.first_round, resumed.last_round) == (2, STEPS)
    assert_same_run_files(reference, run_dir, range(1, STEPS + 1))


@pytest.mark.slow
def test_an_aggregator_that_dies_is_replaced_and_the_lost_steps_redone(runs, monkeypatch, tmp_path):
    """Step 2 is aggregated, then its aggregator dies before writing it (once step 3 has
    begun): the steps after round_0001 are redone from the files on disk, with the same bits."""
    reference, _ = runs
    fault = {"round": 2, "aggregator": "exit_before_checkpoint", "once_file": str(tmp_path / "x")}
    monkeypatch.setenv(FAULTS_ENV, json.dumps([fault]))
    messages: list[str] = []
    result = run_experiment(config_from_dict(three_clients(tmp_path)), log=messages.append,
                            show_progress=False)  # fmt: skip
    redone = [m for m in messages if "the aggregator failed" in m]
    assert len(redone) == 1 and "from round 2 on" in redone[0], messages
    assert [m["round"] for m in result.metrics] == list(range(1, STEPS + 1))
    assert_same_run_files(reference, result.run_dir, range(1, STEPS + 1))


@pytest.mark.slow
def test_resume_names_a_damaged_version_that_updates_in_flight_started_from(runs, tmp_path):
    """After step 2 the updates in flight started from version 1: with round_0001's adapter
    damaged, --resume stops with exit 2's error naming it instead of training from wrong bits."""
    reference, _ = runs
    raw = three_clients(tmp_path)
    run_dir = tmp_path / "runs" / "t"
    run_dir.parent.mkdir(parents=True)
    shutil.copytree(reference, run_dir)
    for version in range(3, STEPS + 1):
        shutil.rmtree(run_dir / f"rounds/round_{version:04d}")
    checkpoint.point_latest(run_dir, 2)
    (run_dir / "rounds/round_0001/adapter_model.safetensors").write_bytes(b"damaged")
    with pytest.raises(FedsimInputError, match="round_0001 is needed"):
        _run(raw, resume=True, allow_config_change=True)  # the copy was written elsewhere
