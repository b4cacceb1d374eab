"""`fedsim report` comparing federated algorithms: global loss, uplink bytes and epsilon."""

import json
from pathlib import Path

import yaml

from fedsim.cli import main


def _fake_run(root: Path, name: str, records: list[dict]) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {"run": {"rounds": len(records)}, "server": {"strategy": name, "clients_per_round": 2}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [
        {"round": r, "clients": [0, 1], "train_loss": 3.0 - r / 10, **extra}
        for r, extra in enumerate(records, start=1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir


def test_comparison_shows_global_loss_uplink_and_epsilon(tmp_path):
    plain = _fake_run(
        tmp_path,
        "fedavg",
        [{"global_loss": x, "uplink_bytes": 500_000} for x in (5.0, 4.0, 3.0, 2.0)],
    )
    private = _fake_run(
        tmp_path,
        "dp",
        [{"global_loss": 4.0, "uplink_bytes": 250_000, "epsilon": e} for e in (0.5, 0.75)],
    )
    out = tmp_path / "cmp"
    assert main(["report", str(plain), str(private), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| run | rounds | final train loss | global loss (last 3 rounds) | uplink MB |" in text
    # global loss: mean of rounds 2-4 (4, 3, 2); uplink: 4 x 0.5 MB
    assert "| fedavg | 4 | 2.6000 | 3.0000 | 2.00 | – |" in text
    assert "| dp | 2 | 2.8000 | 4.0000 | 0.50 | 0.750 |" in text
