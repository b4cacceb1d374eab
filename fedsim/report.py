"""Reports from run directories: loss curves of one run or several runs side by side.

`fedsim report RUN_DIR [RUN_DIR ...]` reads each run's metrics.jsonl and round.json files (nothing
is recomputed) and writes `report.md` and `loss.png`: per round, the mean training loss of the
round's clients and the loss of the incoming global adapter (each client's first local step runs at
the global weights, before any update, so its loss scores the previous round's global adapter on
that client's data), plus uplink bytes and, for DP runs, epsilon.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsim import checkpoint
from fedsim.errors import FedsimInputError


@dataclass
class RunCurves:
    """What a report shows of one run."""

    name: str
    strategy: str
    rounds: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    global_loss: list[float] = field(default_factory=list)
    uplink_bytes: int = 0
    epsilon: float | None = None


def _first_step_loss(info: dict[str, Any]) -> float:
    """Sample-weighted mean over the round's clients of the loss of their first local step."""
    pairs = [
        (c["losses"][0], c["samples"])
        for c in info.get("client_results", [])
        if c.get("ok") and c.get("losses")
    ]
    total = sum(n for _, n in pairs)
    return sum(loss * n for loss, n in pairs) / total if total else math.nan


def load_curves(run_dir: str | Path) -> RunCurves:
    """Read a run directory's per-round metrics; FedsimInputError if it is not one."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FedsimInputError(f"{run_dir}: not a fedsim run directory (no config.yaml)")
    config = yaml.safe_load(config_path.read_text())
    curves = RunCurves(run_dir.name, config.get("server", {}).get("strategy", "?"))
    for round_idx in checkpoint.list_rounds(run_dir):
        path = run_dir / checkpoint.ROUNDS_DIR / checkpoint.round_name(round_idx)
        info = json.loads((path / checkpoint.ROUND_INFO_FILE).read_text())
        curves.rounds.append(round_idx)
        curves.train_loss.append(float(info.get("train_loss", math.nan)))
        curves.global_loss.append(_first_step_loss(info))
        curves.uplink_bytes += int(info.get("bytes", {}).get("uplink", 0))
        if "dp" in info:
            curves.epsilon = float(info["dp"]["epsilon"])
    if not curves.rounds:
        raise FedsimInputError(f"{run_dir}: has no completed round")
    return curves


def _mean_tail(values: list[float], n: int = 3) -> float:
    tail = [v for v in values[-n:] if not math.isnan(v)]
    return sum(tail) / len(tail) if tail else math.nan


def comparison_markdown(runs: list[RunCurves]) -> str:
    """A summary table (one row per run) and a per-round table of the global adapter's loss."""
    lines = [
        "| run | strategy | rounds | train loss (last) | global loss (last 3 rounds) "
        "| uplink MB | epsilon |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        eps = f"{r.epsilon:.3f}" if r.epsilon is not None else "-"
        lines.append(
            f"| {r.name} | {r.strategy} | {r.rounds[-1]} | {r.train_loss[-1]:.4f} | "
            f"{_mean_tail(r.global_loss):.4f} | {r.uplink_bytes / 1e6:.2f} | {eps} |"
        )
    all_rounds = sorted({i for r in runs for i in r.rounds})
    lines += [
        "",
        "Loss of the incoming global adapter (first local step of the round's clients):",
        "",
        "| round | " + " | ".join(r.name for r in runs) + " |",
        "|---" * (len(runs) + 1) + "|",
    ]
    for i in all_rounds:
        cells = []
        for r in runs:
            value = r.global_loss[r.rounds.index(i)] if i in r.rounds else math.nan
            cells.append("-" if math.isnan(value) else f"{value:.4f}")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_losses(runs: list[RunCurves], path: Path) -> None:
    """Train loss and global-adapter loss per round, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in runs:
        axes[0].plot(r.rounds, r.train_loss, marker=".", label=r.name)
        axes[1].plot(r.rounds, r.global_loss, marker=".", label=r.name)
    axes[0].set_title("mean client training loss")
    axes[1].set_title("loss of the incoming global adapter")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Write report.md and loss.png for the given runs into `out_dir`; returns report.md."""
    runs = [load_curves(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_losses(runs, out / "loss.png")
    text = "# fedsim report\n\n" + comparison_markdown(runs) + "\n![loss](loss.png)\n"
    checkpoint.write_text_atomic(out / "report.md", text)
    return out / "report.md"
