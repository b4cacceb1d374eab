"""The run directory a real run leaves: fedsim's marker, the umask's modes on every file, every
config the run has used, and an --overwrite that replaces only what fedsim made."""

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from fedsim import rundir
from fedsim.config import config_from_dict
from fedsim.driver import RunResult, run_experiment
from fedsim.round_record import RoundRecord
from tests.conftest import tiny_experiment

pytestmark = pytest.mark.ray
QUIET = {"log": lambda _: None, "show_progress": False}


def _written_by(path: Path) -> str:
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {})["round"]


def _run(raw: dict, **flags: bool) -> RunResult:
    return run_experiment(config_from_dict(raw), **QUIET, **flags)


@pytest.fixture(scope="module")
def resumed_with_a_new_lr(ray_local, tmp_path_factory) -> tuple[Path, dict]:
    """Two rounds of SCAFFOLD (it also writes client state), then one more with another lr."""
    raw = tiny_experiment(
        tmp_path_factory.mktemp("history"), run={"rounds": 2}, server={"strategy": "scaffold"}
    )
    _run(raw)
    raw["run"]["rounds"] = 3
    raw["client"]["lr"] = 5e-3
    result = _run(raw, resume=True, allow_config_change=True)
    assert (result.first_round, result.last_round) == (3, 3)
    return result.run_dir, raw


def test_every_config_the_run_used_is_kept(resumed_with_a_new_lr):
    run_dir, _ = resumed_with_a_new_lr
    history = sorted(p.name for p in (run_dir / "configs").iterdir())
    assert history == ["round_0001.yaml", "round_0003.yaml"]
    first = yaml.safe_load((run_dir / "configs/round_0001.yaml").read_text())
    then = yaml.safe_load((run_dir / "configs/round_0003.yaml").read_text())
    assert (first["client"]["lr"], first["run"]["rounds"]) == (1e-2, 2)
    assert (then["client"]["lr"], then["run"]["rounds"]) == (5e-3, 3)
    assert (run_dir / "config.yaml").read_text() == (
        run_dir / "configs/round_0003.yaml"
    ).read_text()


def test_every_file_has_the_umasks_mode(resumed_with_a_new_lr):
    run_dir, _ = resumed_with_a_new_lr
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"adapter_model.safetensors", "round.json", "partition.json", "metrics.jsonl"} <= names
    assert any(p.parent.name == "clients" for p in files)  # SCAFFOLD's client state
    wrong = {
        str(p.relative_to(run_dir)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in files
        if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~umask
    }
    assert wrong == {}
    folders = [p for p in run_dir.rglob("*") if p.is_dir()]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o777 & ~umask for p in folders)


def test_the_run_directory_carries_fedsims_marker(resumed_with_a_new_lr):
    run_dir, _ = resumed_with_a_new_lr
    assert rundir.is_fedsim_dir(run_dir)


def test_round_json_and_metrics_hold_the_same_record(resumed_with_a_new_lr):
    run_dir, _ = resumed_with_a_new_lr
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3]
    for line in lines:
        info = json.loads((run_dir / f"rounds/round_{line['round']:04d}/round.json").read_text())
        record = RoundRecord.from_json(line).to_json()
        assert {k: info[k] for k in record} == record  # the same figures, `seconds` included
        assert set(line) - set(record) == {"checkpoint_seconds", "checkpoint_wait_seconds"}


# Last: it replaces the module's run.
def test_overwrite_replaces_a_fedsim_run_and_leaves_nothing_behind(resumed_with_a_new_lr):
    run_dir, raw = resumed_with_a_new_lr
    raw = {**raw, "run": {**raw["run"], "rounds": 1}}
    result = _run(raw, overwrite=True)
    assert result.last_round == 1
    assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == ["round_0001"]
    states = list((run_dir / "clients").glob("*.safetensors"))
    assert states and all(_written_by(p) == "1" for p in states)  # none left from the old run
    assert sorted(p.name for p in (run_dir / "configs").iterdir()) == ["round_0001.yaml"]
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]  # nothing moved aside
