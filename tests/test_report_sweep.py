"""`fedsim report` over a scalability sweep: runs that differ in registered clients and/or
clients per round get a sweep table and plot; other run sets do not."""

import json
from pathlib import Path

import yaml

from fedsim.cli import main


def _fake_run(root: Path, clients: int, per_round: int, seconds: list[float]) -> Path:
    run_dir = root / f"n{clients}_k{per_round}"
    run_dir.mkdir(parents=True)
    config = {
        "run": {"rounds": len(seconds)},
        "data": {"num_clients": clients},
        "server": {"strategy": "fedavg", "clients_per_round": per_round},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [
        {
            "round": r,
            "clients": list(range(per_round)),
            "num_clients": per_round,
            "train_loss": 3.0,
            "seconds": s,
            "driver_peak_rss_mb": 300.0 + clients / 100 + r,  # a high-water mark: grows
            "worker_peak_rss_mb": 500.0 + r,
            "aggregator_peak_rss_mb": 200.0,
            "object_store_bytes": 2 * per_round * 100_000,
        }
        for r, s in enumerate(seconds, start=1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir


def test_sweep_table_and_plot(tmp_path: Path) -> None:
    # round 1 (the warm-up) is slow and left out of the median
    runs = [
        _fake_run(tmp_path, 10_000, 5, [30.0, 2.0, 4.0, 3.0]),
        _fake_run(tmp_path, 10, 5, [30.0, 1.0, 2.0, 3.0]),
        _fake_run(tmp_path, 10, 10, [9.0]),
    ]
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Scalability sweep" in text and "![sweep](sweep.png)" in text
    assert (out / "sweep.png").stat().st_size > 10_000
    assert not (out / "participation.png").exists()  # no 10,000-row grid for a sweep
    rows = [line for line in text.splitlines() if line.endswith(("_k5 |", "_k10 |"))]
    # sorted by clients per round, then clients; a one-round run falls back to round 1
    assert rows == [
        "| 10 | 5 | 4 | 2.00 | 304 | 504 | 200 | 1.000 | n10_k5 |",
        "| 10000 | 5 | 4 | 3.00 | 404 | 504 | 200 | 1.000 | n10000_k5 |",
        "| 10 | 10 | 1 | 9.00 | 301 | 501 | 200 | 2.000 | n10_k10 |",
    ]


def test_runs_of_one_size_are_no_sweep(tmp_path: Path) -> None:
    runs = [_fake_run(tmp_path / x, 10, 5, [3.0, 2.0]) for x in ("a", "b")]
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert "Scalability sweep" not in (out / "report.md").read_text()
    assert not (out / "sweep.png").exists()
    assert (out / "participation.png").exists()


def test_old_runs_without_resource_figures(tmp_path: Path) -> None:
    runs = [_fake_run(tmp_path, n, 2, [3.0, 2.0]) for n in (4, 8)]
    for run in runs:  # as written before the resource figures existed
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        keep = ("round", "clients", "num_clients", "train_loss", "seconds")
        text = "".join(json.dumps({k: x[k] for k in keep}) + "\n" for x in lines)
        (run / "metrics.jsonl").write_text(text)
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| 8 | 2 | 2 | 2.00 | – | – | – | – | n8_k2 |" in text
    assert (out / "sweep.png").exists()
