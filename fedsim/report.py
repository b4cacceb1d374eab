"""`fedsim report`: report.md and PNG plots from one or more run directories.

For one run: the training curve, each question set's metrics and judge scores per round, the
per-category breakdown of the newest evaluated round, a heat map of exact match per category and
round, and which clients took part in which round. For several runs: one comparison table (each
run's newest evaluated round), the same curves overlaid and the heat maps stacked; when the runs
differ in registered clients and/or clients per round (a scalability sweep), also a table and a
plot of round time, peak memory and object-store traffic against the number of clients. Where
`fedsim eval --personalized` has run, also each client's loss under the global and the
personalized models, in one plot. Everything is read from files the trainer and evaluation jobs
wrote (metrics.jsonl, eval.jsonl, config.yaml, rounds/*/eval/summary.json and personalized.json);
nothing is recomputed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
import yaml
from matplotlib.ticker import MaxNLocator

from fedsim import checkpoint
from fedsim.errors import FedsimInputError

EVAL_FILE = "eval.jsonl"  # fedsim.eval.job.EVAL_FILE, without importing the evaluation stack
PERSONALIZED_FILE = "personalized.json"  # fedsim.eval.personalized.RESULT_FILE, likewise
PERSONALIZED_PLOT = "personalized.png"

EVAL_METRICS: tuple[tuple[str, str], ...] = (
    ("loss", "held-out loss"),
    ("perplexity", "perplexity"),
    ("rouge_l", "ROUGE-L"),
    ("exact_match", "exact match"),
    ("judge_score", "judge score (1-10)"),
    ("win_rate", "win rate vs baseline"),
)


@dataclass
class RunData:
    """What a report needs from one run directory."""

    path: Path
    label: str
    config: dict[str, Any]
    train: list[dict[str, Any]]
    evals: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    """Question set -> round -> the newest eval line for it."""

    @property
    def rounds_planned(self) -> int:
        return int(self.config.get("run", {}).get("rounds", 0))

    @property
    def num_clients(self) -> int:
        return int(self.config.get("data", {}).get("num_clients", 0))

    def newest_eval(self, name: str) -> tuple[int, dict[str, Any]] | None:
        rounds = self.evals.get(name)
        if not rounds:
            return None
        r = max(rounds)
        return r, rounds[r]


def load_run(path: Path, label: str | None = None) -> RunData:
    """Read config.yaml, metrics.jsonl (training lines) and eval.jsonl (evaluation results).

    Eval lines of run directories written before eval.jsonl existed are in metrics.jsonl and are
    read from there too; an eval.jsonl line is newer than any of those. The newest line per
    (set, round) wins, except that a line recording another adapter than the round's current one
    (the round was redone after a resume) is stale and dropped.
    """
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise FedsimInputError(f"{path}: not a run directory (no config.yaml)")
    config = yaml.safe_load(config_path.read_text()) or {}
    train: dict[int, dict[str, Any]] = {}
    evals: dict[str, dict[int, dict[str, Any]]] = {}
    adapters = _AdapterHashes(path)
    for source in (path / checkpoint.METRICS_FILE, path / EVAL_FILE):
        for where, record in _json_lines(source):
            if record.get("kind") == "eval":
                _check_eval_line(where, record)
                if adapters.current(record):
                    evals.setdefault(record["set"], {})[record["round"]] = record
            elif "round" in record and source.name == checkpoint.METRICS_FILE:
                train[int(record["round"])] = record
    return RunData(path, label or path.name, config, [train[r] for r in sorted(train)], evals)


def _json_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(`FILE:LINE`, record) of every non-blank line of a JSON-lines file; none if it is absent."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise FedsimInputError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(record, dict):
            raise FedsimInputError(f"{path}:{number}: expected a JSON object")
        records.append((f"{path}:{number}", record))
    return records


def _check_eval_line(where: str, record: dict[str, Any]) -> None:
    if not isinstance(record.get("set"), str) or not isinstance(record.get("round"), int):
        raise FedsimInputError(f"{where}: an eval line without a set name and a round number")


class _AdapterHashes:
    """The sha256 of each round's adapter as its round.json records it, read on demand."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._known: dict[int, str | None] = {}

    def _of(self, round_idx: int) -> str | None:
        if round_idx not in self._known:
            info = self.run_dir / checkpoint.ROUNDS_DIR / checkpoint.round_name(round_idx)
            try:
                files = json.loads((info / checkpoint.ROUND_INFO_FILE).read_text())["files"]
                self._known[round_idx] = files[checkpoint.ADAPTER_FILE]
            except (OSError, ValueError, KeyError, TypeError):
                self._known[round_idx] = None
        return self._known[round_idx]

    def current(self, record: dict[str, Any]) -> bool:
        """False only when the line names an adapter and the round now has another one; lines
        without a hash (older fedsim) and rounds no longer on disk are kept."""
        recorded = record.get("adapter_sha256")
        now = self._of(record["round"]) if recorded else None
        return recorded is None or now is None or now == recorded


def _labels(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _eval_cells(record: dict[str, Any]) -> list[str]:
    judge = "–"
    if record.get("judge_score") is not None or "judge_n" in record:
        judge = f"{_fmt(record.get('judge_score'), 2)} (n {record.get('judge_n', 0)}"
        judge += f", {record.get('judge_excluded', 0)} excl.)"
    win = "–"
    if "win_rate" in record:
        win = (
            f"{_fmt(record.get('win_rate'), 3)} ({record.get('wins', 0)}W "
            f"{record.get('losses', 0)}L {record.get('ties', 0)}T"
            f", {record.get('pair_excluded', 0)} excl.)"
        )
    cost = record.get("judge_cost_usd")
    return [
        _fmt(record.get("loss")),
        _fmt(record.get("perplexity"), 2),
        _fmt(record.get("rouge_l"), 3),
        _fmt(record.get("exact_match"), 3),
        judge,
        win,
        f"${cost:.4f}" if cost is not None else "–",
    ]


EVAL_HEADER = ["loss", "ppl", "ROUGE-L", "exact", "judge", "win rate", "judge cost"]


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------


def plot_train_loss(runs: list[RunData], out: Path) -> Path | None:
    if not any(r.train for r in runs):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for run in runs:
        if run.train:
            ax.plot(
                [m["round"] for m in run.train],
                [m["train_loss"] for m in run.train],
                marker="o",
                markersize=3,
                label=run.label,
            )
    ax.set_xlabel("round")
    ax.set_ylabel("train loss (mean over clients)")
    ax.set_title("Training loss per round")
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    return _save(fig, out / "train_loss.png")


def plot_eval(runs: list[RunData], name: str, out: Path) -> Path | None:
    """One panel per metric that any run has for question set `name`; runs overlaid."""
    metrics = [
        (key, title)
        for key, title in EVAL_METRICS
        if any(key in rec for run in runs for rec in run.evals.get(name, {}).values())
    ]
    if not metrics:
        return None
    cols = min(3, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, metrics, strict=False):
        for run in runs:
            points = sorted(
                (r, rec[key]) for r, rec in run.evals.get(name, {}).items() if key in rec
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=run.label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if key == "judge_score":
            ax.set_ylim(1, 10)
        if key in ("exact_match", "win_rate", "rouge_l"):
            ax.set_ylim(-0.02, 1.02)
    spare = list(axes.flat)[len(metrics) :]
    for ax in spare:
        ax.axis("off")
    if len(runs) > 1:  # in a spare panel when there is one, else over the first
        handles, labels = axes.flat[0].get_legend_handles_labels()
        (spare[0] if spare else axes.flat[0]).legend(handles, labels, fontsize=8, loc="upper left")
    fig.suptitle(f"Evaluation on '{name}' per round")
    return _save(fig, out / f"eval_{name}.png")


def plot_participation(runs: list[RunData], out: Path) -> Path | None:
    """Client x round grid: a cell is filled where the client trained in that round."""
    shown = [r for r in runs if r.train and r.num_clients]
    if not shown:
        return None
    fig, axes = plt.subplots(
        1, len(shown), figsize=(max(4.5, 5.5 * len(shown)), 3.8), squeeze=False
    )
    for ax, run in zip(axes[0], shown, strict=True):
        grid = np.zeros((run.num_clients, len(run.train)))
        for col, m in enumerate(run.train):
            for c in m.get("clients", []):
                if 0 <= c < run.num_clients:
                    grid[c, col] = 1
        ax.imshow(grid, aspect="auto", cmap="Greens", interpolation="nearest", vmin=0, vmax=1)
        rounds = [m["round"] for m in run.train]
        ticks = np.linspace(0, len(rounds) - 1, min(len(rounds), 10)).round().astype(int)
        ax.set_xticks(ticks, [str(rounds[t]) for t in ticks])
        ax.set_xlabel("round")
        ax.set_ylabel("client")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{run.label}: clients per round", fontsize=10)
    return _save(fig, out / "participation.png")


HEATMAP_FILE = "exact_match_heatmap.png"
TRAIN_EXACT_KEY = "exact_match_by_category"
"""Training-line field with a round's held-out exact match per category ({category: value}),
for drivers that score a few held-out records every round (`fedsim.eval.metrics`)."""

CategorySeries = dict[int, dict[str, float]]
"""Round -> category -> exact match."""


def category_exact_match(run: RunData, name: str) -> CategorySeries:
    """Exact match per category of every evaluated round of question set `name`, read from
    each round's eval/summary.json; rounds without one or without exact-match rows are left out."""
    series: CategorySeries = {}
    for r in sorted(run.evals.get(name, {})):
        path = run.path / "rounds" / checkpoint.round_name(r) / "eval" / "summary.json"
        try:
            cats = json.loads(path.read_text())["sets"][name]["exact_match"]["by_category"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        row = {c: float(v["mean"]) for c, v in cats.items() if v.get("n")}
        if row:
            series[r] = row
    return series


def train_exact_match(run: RunData) -> CategorySeries:
    """The per-round held-out exact match per category that training lines carry, if any."""
    series: CategorySeries = {}
    for m in run.train:
        cats = m.get(TRAIN_EXACT_KEY)
        if isinstance(cats, dict) and cats and isinstance(m.get("round"), int):
            series[m["round"]] = {str(c): float(v) for c, v in cats.items() if v is not None}
    return series


def heatmap_panels(runs: list[RunData]) -> list[tuple[str, CategorySeries]]:
    """(title, series) of every run and source that has per-category exact match per round:
    the training lines' per-round figure, then each question set's evaluations."""
    panels = []
    for run in runs:
        sources = [("held-out, per round", train_exact_match(run))]
        sources += [(f"eval '{name}'", category_exact_match(run, name)) for name in run.evals]
        panels += [(f"{run.label}: {what}", series) for what, series in sources if series]
    return panels


def plot_category_heatmap(runs: list[RunData], out: Path) -> Path | None:
    """Category x round heat map of exact match (0 to 1), one panel per run and source."""
    panels = heatmap_panels(runs)
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 0.5 + 2.6 * len(panels)), squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels, strict=True):
        image = _draw_heatmap(ax, series)
        ax.set_title(title, fontsize=10)
    axes[-1, 0].set_xlabel("round")  # on the last panel only: it would cover the next title
    fig.colorbar(image, ax=list(axes[:, 0]), label="exact match", shrink=0.8)
    # tight_layout cannot place a colorbar shared by several panels: saved as drawn
    path = out / HEATMAP_FILE
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _draw_heatmap(ax: Any, series: CategorySeries) -> Any:
    rounds = sorted(series)
    cats = sorted({c for row in series.values() for c in row})
    grid = np.full((len(cats), len(rounds)), np.nan)
    for j, r in enumerate(rounds):
        for i, c in enumerate(cats):
            grid[i, j] = series[r].get(c, np.nan)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ticks = np.linspace(0, len(rounds) - 1, min(len(rounds), 20)).round().astype(int)
    ax.set_xticks(ticks, [str(rounds[t]) for t in ticks])
    ax.set_yticks(range(len(cats)), cats, fontsize=8)
    if len(rounds) <= 12:  # the numbers themselves while they fit in the cells
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                colour = "black" if value > 0.6 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    return image


# ------------------------------------------------------------------------------------------
# Scalability sweep
# ------------------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    """One run of a sweep, reduced to the figures the sweep compares."""

    label: str
    num_clients: int
    per_round: int
    rounds: int
    round_seconds: float | None
    """Median round time over rounds 2.. (round 1 starts the workers); round 1 if it is alone."""
    driver_rss_mb: float | None
    worker_rss_mb: float | None
    aggregator_rss_mb: float | None
    """Peak RSS (MiB) of each process over the run: the largest value any round recorded."""
    object_store_mb: float | None
    """Mean bytes per round through the object store (`object_store_bytes`), in MB (10^6)."""


def _per_round(run: RunData) -> int:
    k = run.config.get("server", {}).get("clients_per_round")
    if k is None:  # a fraction, or every client: what the rounds actually had
        k = max((int(m.get("num_clients", 0)) for m in run.train), default=0)
    return int(k)


def _peak(run: RunData, key: str) -> float | None:
    values = [m[key] for m in run.train if m.get(key) is not None]
    return max(values) if values else None


def sweep_points(runs: list[RunData]) -> list[SweepPoint] | None:
    """The runs as a sweep, sorted by clients per round then registered clients; None unless
    there are several runs that differ in `data.num_clients` and/or `server.clients_per_round`."""
    if len(runs) < 2 or len({(r.num_clients, _per_round(r)) for r in runs}) < 2:
        return None
    points = []
    for run in runs:
        timed = run.train[1:] or run.train
        seconds = [m["seconds"] for m in timed if m.get("seconds") is not None]
        moved = [m["object_store_bytes"] for m in run.train if "object_store_bytes" in m]
        points.append(
            SweepPoint(
                label=run.label,
                num_clients=run.num_clients,
                per_round=_per_round(run),
                rounds=len(run.train),
                round_seconds=float(np.median(seconds)) if seconds else None,
                driver_rss_mb=_peak(run, "driver_peak_rss_mb"),
                worker_rss_mb=_peak(run, "worker_peak_rss_mb"),
                aggregator_rss_mb=_peak(run, "aggregator_peak_rss_mb"),
                object_store_mb=sum(moved) / len(moved) / 1e6 if moved else None,
            )
        )
    return sorted(points, key=lambda p: (p.per_round, p.num_clients, p.label))


SWEEP_PANELS: tuple[tuple[str, str], ...] = (
    ("round_seconds", "median round time (s, rounds 2..)"),
    ("driver_rss_mb", "driver peak RSS (MiB)"),
    ("worker_rss_mb", "worker peak RSS (MiB)"),
    ("object_store_mb", "object store MB per round"),
)


def plot_sweep(points: list[SweepPoint], out: Path) -> Path:
    """2x2 panels against registered clients (log scale), one line per clients-per-round."""
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 6.5), squeeze=False)
    for ax, (key, title) in zip(axes.flat, SWEEP_PANELS, strict=True):
        values = [getattr(p, key) for p in points if getattr(p, key) is not None]
        for k in sorted({p.per_round for p in points}):
            xy = [
                (p.num_clients, getattr(p, key))
                for p in points
                if p.per_round == k and getattr(p, key) is not None
            ]
            if xy:
                xs, ys = zip(*sorted(xy), strict=True)
                ax.plot(xs, ys, marker="o", markersize=4, label=f"{k} per round")
        ax.set_xscale("log")
        ax.set_xlabel("registered clients")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.15 * max(values) if values and max(values) > 0 else 1)
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Scalability: cost against registered clients")
    return _save(fig, out / "sweep.png")


def sweep_table(points: list[SweepPoint]) -> list[str]:
    """The sweep as a markdown table, one row per run."""
    header = [
        "clients",
        "per round",
        "rounds",
        "round s (median, 2..)",
        "driver peak RSS MiB",
        "worker peak RSS MiB",
        "aggregator peak RSS MiB",
        "object store MB/round",
        "run",
    ]
    rows = [
        [
            str(p.num_clients),
            str(p.per_round),
            str(p.rounds),
            _fmt(p.round_seconds, 2),
            _fmt(p.driver_rss_mb, 0),
            _fmt(p.worker_rss_mb, 0),
            _fmt(p.aggregator_rss_mb, 0),
            _fmt(p.object_store_mb, 3),
            p.label,
        ]
        for p in points
    ]
    return _table(header, rows)


def _sweep_markdown(points: list[SweepPoint], plot: Path | None) -> list[str]:
    lines = ["## Scalability sweep", ""]
    lines += [
        "Round time is the median over rounds 2.. (round 1 starts the workers). Peak RSS is each "
        "process's high-water mark (ru_maxrss) over the run; worker: the largest of the workers. "
        "Object store: fedsim's accounting of the bytes a round moves through Ray's object store "
        "(the global adapter per dispatched client, the uploads, SCAFFOLD's contexts), mean over "
        "rounds.",
        "",
        *sweep_table(points),
        "",
    ]
    if plot:
        lines += ["![sweep](sweep.png)", ""]
    return lines


# ------------------------------------------------------------------------------------------
# Personalized evaluation: global vs personalized loss per client
# ------------------------------------------------------------------------------------------


def newest_personalized(run: RunData) -> dict[str, Any] | None:
    """The newest round's personalized.json (`fedsim eval --personalized`) whose adapter is
    still the round's; None when there is none."""
    adapters = _AdapterHashes(run.path)
    for round_idx in reversed(checkpoint.list_rounds(run.path)):
        path = (
            run.path
            / checkpoint.ROUNDS_DIR
            / checkpoint.round_name(round_idx)
            / "eval"
            / PERSONALIZED_FILE
        )
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result.get("models"), dict) and adapters.current(result):
            return result
    return None


def plot_personalized(runs: list[RunData], out: Path) -> Path | None:
    """One panel per run with personalized results: each client's held-out loss under the
    global model and under each personalized one, clients ordered by their global loss."""
    panels = [
        (run, r) for run in runs if (r := newest_personalized(run)) and "global" in r["models"]
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 3.4 * len(panels)), squeeze=False)
    for ax, (run, result) in zip(axes[:, 0], panels, strict=True):
        models = result["models"]
        glob = models["global"]["clients"]
        order = sorted(glob, key=lambda c: (glob[c].get("loss") is None, glob[c].get("loss")))
        xs = np.arange(len(order))
        for name, model in models.items():
            ys = [model["clients"].get(c, {}).get("loss") for c in order]
            ys = [np.nan if y is None else y for y in ys]
            style = {"color": "black", "marker": "o"} if name == "global" else {"marker": "^"}
            label = f"{name} (mean {_fmt(model.get('mean_loss'), 3)})"
            ax.plot(xs, ys, linestyle="none", markersize=5, label=label, **style)
        ax.set_xticks(xs, order, fontsize=7)
        ax.set_xlabel("client (ordered by its loss under the global model)")
        ax.set_ylabel("held-out loss")
        ax.set_title(f"{run.label}: round {result['round']}, each client's own slice", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Global vs personalized loss per client")
    return _save(fig, out / PERSONALIZED_PLOT)


PERSONALIZED_HEADER = [
    "model",
    "mean loss",
    "worst-decile loss",
    "mean exact",
    "worst-decile exact",
]


def _personalized_markdown(runs: list[RunData], plot: Path | None) -> list[str]:
    """A table of each personalized result's summary (model, mean and worst decile), and the
    plot; nothing when no run has one."""
    keys = ("mean_loss", "worst_decile_loss", "mean_exact_match", "worst_decile_exact_match")
    compare = len(runs) > 1
    rows, rounds = [], []
    for run in runs:
        result = newest_personalized(run)
        if result is None:
            continue
        rounds.append(result["round"])
        for name, model in result["models"].items():
            cells = [_fmt(model.get(k), 4 if "loss" in k else 3) for k in keys]
            rows.append([*([run.label, str(result["round"])] if compare else []), name, *cells])
    if not rows:
        return []
    lines = ["## Personalized evaluation", ""]
    where = "at each run's newest round scored" if compare else f"at round {rounds[0]}"
    lines += [
        f"Each client on its own held-out slice (`fedsim eval --personalized`) {where}; means "
        "and worst deciles over clients.",
        "",
    ]
    lines += [*_table([*(["run", "round"] if compare else []), *PERSONALIZED_HEADER], rows), ""]
    if plot is not None:
        lines += [f"![global vs personalized loss per client]({PERSONALIZED_PLOT})", ""]
    return lines


SIMULATED_TIME_PLOT = "loss_vs_simulated_time.png"


def simulated_hours(run: RunData) -> dict[int, float] | None:
    """Round -> the simulated clock after it, in hours: an asynchronous step's
    `simulated_clock`, or the sum of the rounds' `simulated_seconds` (the system model's round
    times). None when a round has neither: the run has no simulated clock."""
    clock, hours = 0.0, {}
    for m in run.train:
        if "simulated_clock" in m:
            clock = float(m["simulated_clock"])
        elif m.get("simulated_seconds") is not None:
            clock += float(m["simulated_seconds"])
        else:
            return None
        hours[int(m["round"])] = clock / 3600
    return hours or None


def _loss_set(runs: list[RunData]) -> str | None:
    """The question set whose held-out loss the simulated-time plot shows (`test` first)."""
    names = [n for n in _set_names(runs) if any(
        "loss" in rec for run in runs for rec in run.evals.get(n, {}).values())]  # fmt: skip
    return "test" if "test" in names else (names[0] if names else None)


def plot_loss_vs_simulated_time(runs: list[RunData], out: Path) -> Path | None:
    """Held-out loss against the simulated clock, every run with a clock on one chart: how sync
    rounds and asynchronous steps compare in (simulated) wall time rather than per round."""
    name = _loss_set(runs)
    curves = []
    for run in runs:
        hours = simulated_hours(run)
        if name is None or hours is None:
            continue
        points = sorted(
            (hours[r], rec["loss"])
            for r, rec in run.evals.get(name, {}).items()
            if "loss" in rec and r in hours
        )
        if points:
            curves.append((run.label, points))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, points in curves:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("simulated hours")
    ax.set_ylabel(f"held-out loss ('{name}')")
    ax.set_title("Held-out loss against the simulated clock")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / SIMULATED_TIME_PLOT)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------


def _run_line(run: RunData) -> str:
    c = run.config
    server = c.get("server", {})
    if server.get("client_ids") is not None:
        who = f"clients {server['client_ids']} every round"
    elif server.get("clients_per_round") is not None:
        who = f"{server['clients_per_round']} per round"
    else:
        who = f"fraction {server.get('fraction')} per round"
    return (
        f"{len(run.train)}/{run.rounds_planned} rounds, {run.num_clients} clients ({who}), "
        f"{server.get('strategy', '?')}, model {c.get('model', {}).get('name_or_path', '?')}, "
        f"data {c.get('data', {}).get('source', '?')}"
    )


def _set_names(runs: list[RunData]) -> list[str]:
    names: list[str] = []
    for run in runs:
        names += [n for n in run.evals if n not in names]
    return names


def _category_section(run: RunData, name: str) -> list[str]:
    newest = run.newest_eval(name)
    if newest is None:
        return []
    r, _ = newest
    summary_path = run.path / "rounds" / checkpoint.round_name(r) / "eval" / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())["sets"][name]
    except (OSError, ValueError, KeyError):
        return []
    columns = _category_columns(summary)
    if not columns:
        return []
    categories = sorted({c for col in columns.values() for c in col})
    rows = [[c] + [columns[k].get(c, "–") for k in columns] for c in categories]
    return [
        f"Per category, round {r}:",
        "",
        *_table(["category", *columns], rows),
        "",
    ]


def _category_columns(summary: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per-category cells of one set's summary.json entry, by column name."""
    columns: dict[str, dict[str, str]] = {}
    by_cat = summary.get("loss_by_category") or {}
    if by_cat:
        columns["loss"] = {c: _fmt(v["loss"]) for c, v in by_cat.items()}
    for key, label, digits in (("rouge_l", "ROUGE-L", 3), ("exact_match", "exact", 3)):
        cats = summary.get(key, {}).get("by_category", {})
        if any(v["n"] for v in cats.values()):
            columns[label] = {c: _fmt(v["mean"], digits) for c, v in cats.items() if v["n"]}
    judge = summary.get("judge") or {}
    if "single" in judge:
        columns["judge"] = {
            c: f"{_fmt(v['mean'], 2)} (n {v['n']})"
            for c, v in judge["single"]["by_category"].items()
        }
    if "pairwise" in judge:
        columns["win rate"] = {
            c: f"{_fmt(v['win_rate'], 3)} (n {v['n']})"
            for c, v in judge["pairwise"]["by_category"].items()
        }
    return columns


def _single_run_markdown(run: RunData, plots: dict[str, Path | None]) -> list[str]:
    lines = [f"# fedsim report: {run.path}", "", _run_line(run), ""]
    lines += ["## Training", ""]
    if run.train:
        rows = [
            [
                str(m["round"]),
                str(m.get("num_clients", "")),
                str(m.get("samples", "")),
                _fmt(m.get("train_loss")),
                _fmt(m.get("seconds"), 1),
            ]
            for m in run.train
        ]
        lines += [*_table(["round", "clients", "samples", "train loss", "seconds"], rows), ""]
    else:
        lines += ["No round has finished yet.", ""]
    if plots.get("train"):
        lines += ["![train loss](train_loss.png)", ""]
    lines += ["## Evaluation", ""]
    names = _set_names([run])
    if not names:
        lines += ["No evaluation yet: `fedsim eval RUN_DIR --all`.", ""]
    for name in names:
        lines += [f"### {name}", ""]
        rows = [[str(r), *_eval_cells(rec)] for r, rec in sorted(run.evals[name].items())]
        lines += [*_table(["round", *EVAL_HEADER], rows), ""]
        lines += _category_section(run, name)
        if plots.get(name):
            lines += [f"![{name}](eval_{name}.png)", ""]
    if plots.get("heatmap"):
        lines += [
            "### Exact match per category and round",
            "",
            f"![exact match per category]({HEATMAP_FILE})",
            "",
        ]
    lines += ["## Client participation", ""]
    if plots.get("participation"):
        counts = np.zeros(run.num_clients, dtype=int)
        for m in run.train:
            for c in m.get("clients", []):
                if 0 <= c < run.num_clients:
                    counts[c] += 1
        per_client = ", ".join(f"{i}: {n}" for i, n in enumerate(counts))
        lines += [
            f"Rounds each client trained in: {per_client}",
            "",
            "![participation](participation.png)",
            "",
        ]
    return lines


ALGO_HEADER = ["global loss (last 3 rounds)", "uplink MB", "epsilon"]


def _algo_cells(run: RunData) -> list[str]:
    """What compares federated algorithms: the loss of the incoming global adapter (the first
    local step of each round's clients) over the last three rounds, the bytes clients sent, and
    the DP budget spent."""
    tail = [m["global_loss"] for m in run.train[-3:] if m.get("global_loss") is not None]
    tail = [x for x in tail if x == x]  # drop NaN (a round without a trained client)
    uplink = sum(m.get("uplink_bytes", 0) for m in run.train)
    epsilon = run.train[-1].get("epsilon") if run.train else None
    return [
        _fmt(sum(tail) / len(tail)) if tail else "–",
        f"{uplink / 1e6:.2f}" if uplink else "–",
        _fmt(epsilon, 3),
    ]


def _comparison_markdown(runs: list[RunData], plots: dict[str, Path | None]) -> list[str]:
    lines = [f"# fedsim report: {len(runs)} runs compared", ""]
    lines += [f"- **{run.label}** ({run.path}): {_run_line(run)}" for run in runs] + [""]
    rows = []
    for run in runs:
        last = run.train[-1] if run.train else {}
        rows.append(
            [run.label, str(last.get("round", 0)), _fmt(last.get("train_loss")), *_algo_cells(run)]
        )
    lines += ["## Training", ""]
    lines += [*_table(["run", "rounds", "final train loss", *ALGO_HEADER], rows), ""]
    if plots.get("train"):
        lines += ["![train loss](train_loss.png)", ""]
    lines += ["## Evaluation (each run's newest evaluated round)", ""]
    for name in _set_names(runs):
        lines += [f"### {name}", ""]
        rows = []
        for run in runs:
            newest = run.newest_eval(name)
            if newest is None:
                rows.append([run.label, "–", *["–"] * len(EVAL_HEADER)])
            else:
                rows.append([run.label, str(newest[0]), *_eval_cells(newest[1])])
        lines += [*_table(["run", "round", *EVAL_HEADER], rows), ""]
        lines += _category_comparison(runs, name)
        if plots.get(name):
            lines += [f"![{name}](eval_{name}.png)", ""]
    if plots.get("heatmap"):
        lines += [
            "## Exact match per category and round",
            "",
            f"![exact match per category]({HEATMAP_FILE})",
            "",
        ]
    if plots.get("participation"):
        lines += ["## Client participation", "", "![participation](participation.png)", ""]
    return lines


def _category_comparison(runs: list[RunData], name: str) -> list[str]:
    """One table per metric: category x run, at each run's newest evaluated round."""
    per_run: dict[str, dict[str, dict[str, str]]] = {}
    for run in runs:
        newest = run.newest_eval(name)
        if newest is None:
            continue
        path = run.path / "rounds" / checkpoint.round_name(newest[0]) / "eval" / "summary.json"
        try:
            per_run[run.label] = _category_columns(json.loads(path.read_text())["sets"][name])
        except (OSError, ValueError, KeyError):
            continue
    lines: list[str] = []
    metrics = []
    for columns in per_run.values():
        metrics += [m for m in columns if m not in metrics]
    for metric in metrics:
        cats = sorted({c for cols in per_run.values() for c in cols.get(metric, {})})
        labels = [label for label in per_run if metric in per_run[label]]
        rows = [[c] + [per_run[label][metric].get(c, "–") for label in labels] for c in cats]
        lines += [f"{metric} per category:", "", *_table(["category", *labels], rows), ""]
    return lines


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write report.md and its PNGs; returns the output folder."""
    if not run_dirs:
        raise FedsimInputError("report: name at least one run directory")
    runs = [load_run(p, label) for p, label in zip(run_dirs, _labels(run_dirs), strict=True)]
    if out is None:
        out = run_dirs[0] / "report" if len(runs) == 1 else Path("report")
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path | None] = {"train": plot_train_loss(runs, out)}
    for name in _set_names(runs):
        plots[name] = plot_eval(runs, name, out)
    plots["heatmap"] = plot_category_heatmap(runs, out)
    points = sweep_points(runs)
    # a client x round grid says nothing at thousands of clients: a sweep gets its own plot
    plots["participation"] = plot_participation(runs, out) if points is None else None
    lines = (
        _single_run_markdown(runs[0], plots)
        if len(runs) == 1
        else _comparison_markdown(runs, plots)
    )
    lines += _personalized_markdown(runs, plot_personalized(runs, out))
    if plot_loss_vs_simulated_time(runs, out) is not None:
        lines += ["## Held-out loss against the simulated clock", "",
                  f"![loss against simulated time]({SIMULATED_TIME_PLOT})", ""]  # fmt: skip
    if points is not None:
        lines += _sweep_markdown(points, plot_sweep(points, out))
    checkpoint.write_text_atomic(out / "report.md", "\n".join(lines).rstrip() + "\n")
    return out
