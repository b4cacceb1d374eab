"""`fedsim report`: the heat map of exact match per category and round."""

import json
from pathlib import Path

import yaml

from fedsim.cli import main
from fedsim.report import HEATMAP_FILE, heatmap_panels, load_run


def _run(root: Path, name: str, per_round: list[dict[str, float]] | None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {"run": {"rounds": 3}, "data": {"num_clients": 4}, "server": {"strategy": "fedavg"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for r in range(1, 4):
        line = {"round": r, "clients": [0, 1], "train_loss": 2.0}
        if per_round is not None:
            line["exact_match_by_category"] = per_round[r - 1]
        lines.append(line)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir


def _eval_round(run_dir: Path, r: int, by_category: dict[str, float]) -> None:
    """An eval.jsonl line and the round's summary.json, as `fedsim eval` writes them."""
    cats = {c: {"mean": v, "n": 10, "excluded": 0} for c, v in by_category.items()}
    summary = {"sets": {"test": {"exact_match": {"mean": 0.5, "by_category": cats}}}}
    eval_dir = run_dir / "rounds" / f"round_{r:04d}" / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "summary.json").write_text(json.dumps(summary))
    with (run_dir / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "eval", "set": "test", "round": r, "exact_match": 0.5}))
        f.write("\n")


def test_heatmap_from_training_lines_and_evaluations(tmp_path: Path) -> None:
    climbing = [{"add": 0.0, "parity": 0.2}, {"add": 0.4, "parity": 0.6}, {"add": 0.8}]
    run_dir = _run(tmp_path, "fed", climbing)
    _eval_round(run_dir, 2, {"add": 0.3, "parity": 1.0})
    _eval_round(run_dir, 3, {"add": 0.9, "parity": 0.7})

    panels = dict(heatmap_panels([load_run(run_dir)]))

    assert panels["fed: held-out, per round"] == {
        1: {"add": 0.0, "parity": 0.2},
        2: {"add": 0.4, "parity": 0.6},
        3: {"add": 0.8},
    }
    assert panels["fed: eval 'test'"] == {
        2: {"add": 0.3, "parity": 1.0},
        3: {"add": 0.9, "parity": 0.7},
    }
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert (out / HEATMAP_FILE).stat().st_size > 5_000
    assert f"![exact match per category]({HEATMAP_FILE})" in (out / "report.md").read_text()


def test_comparison_stacks_one_panel_per_run(tmp_path: Path) -> None:
    a = _run(tmp_path, "centralized", [{"add": 1.0}] * 3)
    b = _run(tmp_path, "local", None)  # nothing per category: no panel
    _eval_round(b, 3, {"add": 0.1})

    titles = [title for title, _ in heatmap_panels([load_run(a), load_run(b)])]

    assert titles == ["centralized: held-out, per round", "local: eval 'test'"]
    out = tmp_path / "cmp"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert (out / HEATMAP_FILE).is_file()


def test_no_heatmap_without_per_category_exact_match(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "plain", None)
    out = tmp_path / "report"

    assert main(["report", str(run_dir), "--out", str(out)]) == 0

    assert not (out / HEATMAP_FILE).exists()
    assert HEATMAP_FILE not in (out / "report.md").read_text()
