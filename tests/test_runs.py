"""`fedsim runs`: the table of run directories, on runs built here with fedsim's own writers
(checkpoint.write_round, append_metrics, rundir.mark_run_dir), one per state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from fedsim import checkpoint, rundir
from fedsim.cli import main
from fedsim.runs import DAMAGED, EMPTY, FINISHED, RESUMABLE, find_runs, read_run
from tests.conftest import tiny_experiment


def make_run(
    output_dir: Path,
    name: str,
    *,
    planned: int,
    rounds: int,
    strategy: str = "fedavg",
    eval_losses: dict[int, float] | None = None,
) -> Path:
    """A run directory as the trainer leaves it after `rounds` of `planned` rounds: marker,
    config.yaml, one checkpoint and one metrics line per round (train loss 2 - round/10), and
    eval.jsonl lines for the rounds in `eval_losses`."""
    raw = tiny_experiment(output_dir.parent, run={"name": name, "rounds": planned})
    raw["server"]["strategy"] = strategy
    run_dir = rundir.make_dir(output_dir / name)
    rundir.mark_run_dir(run_dir)
    rundir.write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(raw))
    for r in range(1, rounds + 1):
        adapter = {"lora_A": torch.full((2, 2), float(r))}
        written = checkpoint.write_round(run_dir, r, adapter, {"r": 2}, {}, {"clients": [0, 1]})
        adapter_sha = json.loads((written / "round.json").read_text())["files"][
            checkpoint.ADAPTER_FILE
        ]
        checkpoint.append_metrics(run_dir, {"round": r, "train_loss": 2 - r / 10, "samples": 9})
        if eval_losses and r in eval_losses:
            line = {"kind": "eval", "round": r, "set": "test", "loss": eval_losses[r]}
            rundir.append_jsonl(run_dir / "eval.jsonl", {**line, "adapter_sha256": adapter_sha})
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """runs/ with one run in each state, plus folders that are not runs."""
    out = tmp_path / "runs"
    make_run(out, "a-finished", planned=2, rounds=2, eval_losses={1: 3.25, 2: 3.125})
    make_run(out, "b-resumable", planned=5, rounds=1, strategy="fedprox")
    corrupt = make_run(out, "c-corrupt", planned=3, rounds=3)
    adapter = corrupt / "rounds" / "round_0003" / checkpoint.ADAPTER_FILE
    adapter.write_bytes(adapter.read_bytes()[:-4] + b"\0\0\0\0")  # one tensor's bytes altered
    gap = make_run(out, "d-gap", planned=3, rounds=3)
    shutil.rmtree(gap / "rounds" / "round_0002")
    make_run(out, "e-empty", planned=4, rounds=0)
    (out / "notes").mkdir()  # a folder of the user's: not a run
    (out / "notes" / "todo.txt").write_text("x")
    shutil.copytree(out / "a-finished", out / ".a-finished.replaced-123")  # being replaced
    return out


def test_each_state_is_read_from_the_run_directory(runs: Path):
    rows = {r.name: r for r in map(read_run, find_runs(runs))}
    assert sorted(rows) == ["a-finished", "b-resumable", "c-corrupt", "d-gap", "e-empty"]

    done = rows["a-finished"]
    assert (done.state, done.rounds_done, done.rounds_planned) == (FINISHED, 2, 2)
    assert (done.strategy, done.clients, done.per_round) == ("fedavg", 6, 3)
    assert done.train_loss == pytest.approx(1.8)
    assert (done.eval_loss, done.eval_round) == (3.125, 2)
    assert done.problem is None

    more = rows["b-resumable"]
    assert (more.state, more.rounds_done, more.rounds_planned) == (RESUMABLE, 1, 5)
    assert more.strategy == "fedprox"
    assert more.train_loss == pytest.approx(1.9)
    assert more.eval_loss is None

    corrupt = rows["c-corrupt"]
    assert (corrupt.state, corrupt.rounds_done) == (DAMAGED, 2)  # resume falls back to round 2
    assert "round_0003/adapter_model.safetensors does not match its sha256" in corrupt.problem
    assert corrupt.problem.endswith("--resume continues after round 2")
    assert corrupt.train_loss == pytest.approx(1.8)  # the loss of the round it stands at

    gap = rows["d-gap"]
    assert gap.state == DAMAGED
    assert "rounds/round_0002 is missing" in gap.problem

    empty = rows["e-empty"]
    assert (empty.state, empty.rounds_done, empty.rounds_planned) == (EMPTY, 0, 4)


def test_latest_naming_a_missing_round_is_damage(tmp_path: Path):
    run_dir = make_run(tmp_path / "runs", "x", planned=2, rounds=2)
    (run_dir / "latest").write_text("round_0007\n")
    row = read_run(run_dir)
    assert row.state == DAMAGED
    assert "names 'round_0007'" in row.problem


def test_unreadable_metrics_make_a_damaged_row_not_an_error(tmp_path: Path):
    run_dir = make_run(tmp_path / "runs", "x", planned=2, rounds=2)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    row = read_run(run_dir)
    assert row.state == DAMAGED
    assert "metrics.jsonl:3: not valid JSON" in row.problem


def test_fedsim_runs_prints_one_row_per_run_and_what_is_damaged(runs: Path, capsys):
    assert main(["runs", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "rounds", "strategy", "clients", "train", "loss", "eval",
                                "loss", "state"]  # fmt: skip
    rows = [line.split() for line in lines[1:6]]
    assert rows[0] == ["a-finished", "2/2", "fedavg", "3", "of", "6", "1.8000", "3.1250",
                       "(round", "2)", "finished"]  # fmt: skip
    assert rows[1] == ["b-resumable", "1/5", "fedprox", "3", "of", "6", "1.9000", "-", "resumable"]
    assert rows[2][:2] == ["c-corrupt", "2/3"] and rows[2][-1] == "damaged"
    assert rows[3][-1] == "damaged"
    assert rows[4] == ["e-empty", "0/4", "fedavg", "3", "of", "6", "-", "-", "empty"]
    assert lines[6].startswith("c-corrupt: ") and lines[7].startswith("d-gap: ")
    assert len(lines) == 8


def test_fedsim_runs_on_one_run_directory_and_on_a_folder_without_runs(tmp_path, capsys):
    run_dir = make_run(tmp_path / "runs", "only", planned=1, rounds=1)
    assert main(["runs", str(run_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["only", "1/1"]
    (tmp_path / "nothing").mkdir()
    assert main(["runs", str(tmp_path / "nothing")]) == 0
    assert capsys.readouterr().out == f"no runs in {tmp_path / 'nothing'}\n"
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_an_async_run_shows_its_clients_in_flight(tmp_path: Path):
    run_dir = make_run(tmp_path / "runs", "async", planned=3, rounds=1)
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw["server"].update(mode="async", concurrency=3, buffer_size=2)
    raw["system"] = {"enabled": True}
    rundir.write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(raw))

    row = read_run(run_dir)

    assert (row.strategy, row.per_round, row.rounds_planned) == ("fedavg (async)", 3, 3)
