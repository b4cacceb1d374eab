"""`fedsim report` over run directories written in the checkpoint format."""

import json
from pathlib import Path

import pytest
import yaml

from fedsim.cli import main
from fedsim.report import comparison_markdown, load_curves


def _fake_run(root: Path, name: str, strategy: str, losses: list[list[float]], dp: bool = False):
    run_dir = root / name
    (run_dir / "rounds").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"server": {"strategy": strategy}}))
    for r, round_losses in enumerate(losses, start=1):
        info = {
            "round": r,
            "train_loss": sum(round_losses) / len(round_losses),
            "client_results": [
                {"ok": True, "samples": 10 * (i + 1), "losses": [loss, loss - 0.5]}
                for i, loss in enumerate(round_losses)
            ],
            "bytes": {"uplink": 1_000_000},
        }
        if dp:
            info["dp"] = {"epsilon": 0.5 * r}
        d = run_dir / "rounds" / f"round_{r:04d}"
        d.mkdir()
        (d / "round.json").write_text(json.dumps(info))
    return run_dir


def test_curves_and_table(tmp_path):
    a = _fake_run(tmp_path, "alg-fedavg", "fedavg", [[3.0, 4.0], [2.0, 2.0]])
    b = _fake_run(tmp_path, "alg-fedadam", "fedadam", [[3.0, 3.0]], dp=True)
    ca, cb = load_curves(a), load_curves(b)
    # first-step losses weighted by samples 10 and 20: (3*10 + 4*20) / 30
    assert ca.global_loss == pytest.approx([110 / 30, 2.0])
    assert ca.rounds == [1, 2] and ca.uplink_bytes == 2_000_000 and ca.epsilon is None
    assert cb.epsilon == 0.5
    table = comparison_markdown([ca, cb])
    assert "| alg-fedavg | fedavg | 2 | 2.0000 | 2.8333 | 2.00 | - |" in table
    assert "| alg-fedadam | fedadam | 1 | 3.0000 | 3.0000 | 1.00 | 0.500 |" in table
    assert "| 2 | 2.0000 | - |" in table


def test_cli_writes_report_and_plot(tmp_path, capsys):
    runs = [_fake_run(tmp_path, f"r{i}", "fedavg", [[3.0], [2.5]]) for i in range(2)]
    out = tmp_path / "cmp"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert (out / "report.md").read_text().startswith("# fedsim report")
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_cli_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a fedsim run directory" in capsys.readouterr().err
