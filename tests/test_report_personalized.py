"""`fedsim report`: global vs personalized loss per client, from `fedsim eval --personalized`'s
personalized.json (the newest round whose adapter is still the round's)."""

import json
from pathlib import Path

import yaml

from fedsim.cli import main
from fedsim.report import PERSONALIZED_PLOT, load_run, newest_personalized


def _run(root: Path, name: str) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {"run": {"rounds": 3}, "data": {"num_clients": 3}, "server": {"strategy": "fedavg"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"round": r, "clients": [0, 1], "train_loss": 2.0} for r in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for r in (1, 2, 3):
        round_dir = run_dir / "rounds" / f"round_{r:04d}"
        round_dir.mkdir(parents=True)
        info = {"files": {"adapter_model.safetensors": f"sha-{r}"}}
        (round_dir / "round.json").write_text(json.dumps(info))
    return run_dir


def _personalized(run_dir: Path, r: int, sha: str, tuned: list[float]) -> None:
    """A personalized.json as `fedsim eval --personalized --finetune-steps 5` writes it."""

    def model(losses: list[float]) -> dict:
        clients = {str(c): {"records": 4, "loss": x} for c, x in enumerate(losses)}
        return {"mean_loss": sum(losses) / len(losses), "worst_decile_loss": max(losses),
                "clients": clients}  # fmt: skip

    result = {
        "round": r,
        "adapter_sha256": sha,
        "strategy": "fedavg",
        "models": {"global": model([2.0, 3.0, 1.0]), "finetune_5": model(tuned)},
    }
    eval_dir = run_dir / "rounds" / f"round_{r:04d}" / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "personalized.json").write_text(json.dumps(result))


def test_the_newest_current_result_is_reported_with_its_plot(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "fed")
    _personalized(run_dir, 1, "sha-1", [1.5, 2.5, 0.5])
    _personalized(run_dir, 3, "sha-of-an-older-round-3", [9.0, 9.0, 9.0])  # round 3 was redone

    newest = newest_personalized(load_run(run_dir))

    assert newest is not None and newest["round"] == 1
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert (out / PERSONALIZED_PLOT).stat().st_size > 5_000
    report = (out / "report.md").read_text()
    assert "| finetune_5 | 1.5000 | 2.5000 | – | – |" in report
    assert "| global | 2.0000 | 3.0000 | – | – |" in report
    assert "at round 1" in report and "9.0000" not in report


def test_runs_without_personalized_results_get_no_section(tmp_path: Path) -> None:
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b")
    out = tmp_path / "report"

    assert main(["report", str(a), "--out", str(out)]) == 0
    assert "Personalized" not in (out / "report.md").read_text()
    assert not (out / PERSONALIZED_PLOT).exists()

    _personalized(b, 2, "sha-2", [1.0, 1.0, 1.0])
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| b | 2 | finetune_5 | 1.0000 | 1.0000 | – | – |" in report
    assert "| a |" not in report.split("## Personalized evaluation")[1]
