"""`fedsim report`: held-out loss against the simulated clock, for synchronous rounds (the sum
of their simulated round times) and asynchronous steps (their `simulated_clock`) on one chart."""

import json
from pathlib import Path

import pytest
import yaml

from fedsim.cli import main
from fedsim.report import SIMULATED_TIME_PLOT, load_run, simulated_hours


def _run(root: Path, name: str, clock_fields: list[dict], losses: dict[int, float]) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {"run": {"rounds": len(clock_fields)}, "data": {"num_clients": 4}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    train = [
        {"round": r, "clients": [0, 1], "train_loss": 2.0, **fields}
        for r, fields in enumerate(clock_fields, start=1)
    ]
    evals = [{"kind": "eval", "set": "test", "round": r, "loss": x} for r, x in losses.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in train))
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in evals))
    return run_dir


def test_sync_rounds_add_up_and_async_steps_carry_their_clock(tmp_path: Path) -> None:
    sync = _run(tmp_path, "sync", [{"simulated_seconds": s} for s in (1800, 3600, 1800)],
                {1: 3.0, 3: 2.0})  # fmt: skip
    fedbuff = _run(tmp_path, "fedbuff", [{"simulated_seconds": 9.0, "simulated_clock": c}
                                         for c in (900, 1800, 2700)], {2: 2.5, 3: 1.5})  # fmt: skip

    assert simulated_hours(load_run(sync)) == {1: 0.5, 2: 1.5, 3: 2.0}
    assert simulated_hours(load_run(fedbuff)) == {1: 0.25, 2: 0.5, 3: 0.75}
    out = tmp_path / "report"
    assert main(["report", str(sync), str(fedbuff), "--out", str(out)]) == 0
    assert (out / SIMULATED_TIME_PLOT).stat().st_size > 5_000
    assert (
        f"![loss against simulated time]({SIMULATED_TIME_PLOT})" in (out / "report.md").read_text()
    )


@pytest.mark.parametrize("missing", [{}, {"simulated_seconds": None}])
def test_a_run_without_the_system_model_has_no_clock_and_no_plot(tmp_path, missing) -> None:
    run_dir = _run(tmp_path, "plain", [{"simulated_seconds": 60.0}, missing], {1: 3.0, 2: 2.0})

    assert simulated_hours(load_run(run_dir)) is None
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert not (out / SIMULATED_TIME_PLOT).exists()
    assert "simulated clock" not in (out / "report.md").read_text()
