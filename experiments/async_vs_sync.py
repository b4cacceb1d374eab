"""FedBuff against synchronous FedAvg on the simulated clock, in miniature (issue 15).

    python experiments/async_vs_sync.py [--quick] [--seeds 0 1 2] [--rounds 60]
        [--eval-every 5] [--target LOSS] [--reuse] [--set KEY=VALUE ...]

The built-in testbed (experiments/quickstart.yaml's data, model and local training) with 200
clients, Dirichlet alpha 0.5, device speeds log-normal with sigma 1 (the middle 90 % of clients
span a 27x range of speeds) and 5 % dropout. For each seed, three runs with the same number of
client updates (rounds x clients per round = server steps x K):

- `sync`: FedAvg, 10 clients a round, no deadline: each round waits for its slowest client;
- `sync_deadline`: the same, with `system.deadline_seconds` at the 80th percentile of the
  clients' simulated round times, inviting more clients (`server.min_updates` 10) for those it
  drops;
- `fedbuff`: `server.mode: async`, concurrency 50, K = 10, staleness 1/sqrt(1 + s).

Every `--eval-every` rounds (and the last) is scored on the held-out split (`fedsim eval`'s
test set). The table gives, per method, the mean and spread over seeds of: simulated hours to
reach the target held-out loss (by default the worst final loss of all runs, so every run
reaches it), the final held-out loss and exact match, the simulated hours of the whole run, the
updates applied and the fraction of client turns wasted (dropped out or past the deadline). The
plot draws held-out loss against simulated hours, every run on one chart.

`--quick` checks the pipeline in minutes: 40 clients, 12 rounds, 5 clients a round, concurrency
10, K = 5, seed 0.

Runs go to runs/async_vs_sync (`--set run.output_dir=...`); the table to results.md, the plot
to loss_vs_simulated_hours.png and a `fedsim report` of every run to report/ there. `--reuse` keeps
runs that are finished (and their scores).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import ray
import yaml

from fedsim import checkpoint, ray_auth
from fedsim.config import apply_override, config_from_dict
from fedsim.driver import run_experiment
from fedsim.eval.job import Evaluator, evaluate_rounds, latest_round, open_run
from fedsim.execution import WORKER_ENV
from fedsim.report import write_report
from fedsim.server.system_model import SystemModel

METHODS = ("sync", "sync_deadline", "fedbuff")
DEADLINE_PERCENTILE = 0.8


@dataclass(frozen=True)
class Scale:
    """The sizes of one experiment: full, or `--quick`."""

    clients: int = 200
    records: int = 8000
    rounds: int = 60
    per_round: int = 10
    concurrency: int = 50
    buffer_size: int = 10


QUICK = Scale(clients=40, records=2000, rounds=12, per_round=5, concurrency=10, buffer_size=5)


def base_config(scale: Scale, seed: int, overrides: list[str]) -> dict[str, Any]:
    """The testbed: quickstart's data, model and local training, 200 clients of varied speed."""
    raw = yaml.safe_load(Path("experiments/quickstart.yaml").read_text())
    raw["run"].update(output_dir="runs/async_vs_sync", seed=seed, rounds=scale.rounds)
    raw["data"].update(num_clients=scale.clients, builtin_records=scale.records)
    raw["data"]["partition"].update(kind="dirichlet", alpha=0.5, min_size=10)
    raw["server"] = {"strategy": "fedavg", "clients_per_round": scale.per_round}
    raw["system"] = {"enabled": True, "speed_sigma": 1.0, "dropout": 0.05}
    raw["eval"]["probe_per_category"] = 0  # scored afterwards, on the whole held-out split
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def variant(raw: dict[str, Any], method: str, scale: Scale, deadline: float | None) -> dict:
    """One method's config; `deadline` is the sync_deadline run's (from `deadline_seconds`)."""
    out = copy.deepcopy(raw)
    out["run"]["name"] = f"{method}_s{raw['run']['seed']}"
    if method == "sync_deadline":
        out["system"]["deadline_seconds"] = deadline
        out["server"]["min_updates"] = scale.per_round
    elif method == "fedbuff":
        out["server"].update(
            mode="async",
            concurrency=scale.concurrency,
            buffer_size=scale.buffer_size,
            staleness={"rule": "polynomial", "a": 0.5},
        )
        # equal client updates: steps x K = rounds x clients per round
        out["run"]["rounds"] = raw["run"]["rounds"] * scale.per_round // scale.buffer_size
    return out


def deadline_seconds(raw: dict[str, Any], adapter_bytes: int) -> float:
    """The 80th percentile of every client's simulated round time (compute, adapter down and
    up), from the same seeded devices the runs use."""
    cfg = config_from_dict(raw)
    system = SystemModel(cfg.system, cfg.run.seed)
    assert cfg.client.local_steps is not None
    times = sorted(
        system.client_seconds(c, cfg.client.local_steps, adapter_bytes)
        for c in range(cfg.data.num_clients)
    )
    return times[math.ceil(DEADLINE_PERCENTILE * len(times)) - 1]


def train(raw: dict[str, Any], reuse: bool) -> Path:
    cfg = config_from_dict(raw)
    if reuse and latest_round(cfg.run_dir) == cfg.run.rounds:
        print(f"reusing {cfg.run_dir}", flush=True)
        return cfg.run_dir
    print(f"training {cfg.run_dir}", flush=True)
    start = time.perf_counter()
    run_experiment(cfg, overwrite=True, log=lambda _: None, show_progress=False)
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    return cfg.run_dir


def round_info(run_dir: Path, r: int) -> dict[str, Any]:
    path = run_dir / checkpoint.ROUNDS_DIR / checkpoint.round_name(r) / checkpoint.ROUND_INFO_FILE
    return json.loads(path.read_text())


@dataclass
class Curve:
    """One run: held-out loss (and exact match) against simulated hours, and its totals."""

    method: str
    seed: int
    hours: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    exact_match: list[float] = field(default_factory=list)
    total_hours: float = 0.0
    updates: int = 0
    wasted: float = 0.0

    def hours_to(self, target: float) -> float | None:
        """Simulated hours at the first scored round whose loss is at most `target`."""
        return next((h for h, x in zip(self.hours, self.loss, strict=True) if x <= target), None)


def score(run_dir: Path, method: str, seed: int, every: int) -> Curve:
    """Held-out loss every `every` rounds, placed on the run's simulated clock."""
    lines = [json.loads(x) for x in (run_dir / checkpoint.METRICS_FILE).read_text().splitlines()]
    lines = [x for x in lines if "train_loss" in x]  # training lines, not eval results
    if method == "fedbuff":  # the step's clock; rounds add up their own durations
        clock = [x["simulated_clock"] for x in lines]
    else:
        clock = list(_running_sum(x["simulated_seconds"] for x in lines))
    rounds = len(lines)
    scored = sorted({*range(every, rounds + 1, every), rounds})
    evaluator = Evaluator(open_run(run_dir), log=lambda _: None)
    results = evaluate_rounds(evaluator, scored)
    evaluator.close()
    curve = Curve(method, seed, total_hours=clock[-1] / 3600)
    for r, result in zip(scored, results, strict=True):
        curve.hours.append(clock[r - 1] / 3600)
        curve.loss.append(result.summary["loss"])
        curve.exact_match.append(result.summary["exact_match"]["mean"])
    curve.updates = sum(len(x["clients"]) - x["num_failed"] for x in lines)
    curve.wasted = wasted_fraction(run_dir, method, lines)
    return curve


def _running_sum(values: Any) -> Any:
    total = 0.0
    for v in values:
        total += v
        yield total


def wasted_fraction(run_dir: Path, method: str, lines: list[dict[str, Any]]) -> float:
    """Client turns that ended without an update (dropped out, or past the deadline), of all
    that ended: the schedule's count for fedbuff, round.json's `system` for rounds."""
    if method == "fedbuff":
        return lines[-1]["wasted_fraction"]
    wasted = ended = 0
    for x in lines:
        system = round_info(run_dir, x["round"])["system"]
        lost = len(system["dropped_out"]) + len(system["stragglers"])
        wasted += lost
        ended += lost + len(system["kept"])
    return wasted / ended if ended else 0.0


def mean_sd(values: list[float | None], digits: int) -> str:
    found = [v for v in values if v is not None]
    if not found:
        return "not reached"
    text = f"{statistics.fmean(found):.{digits}f}"
    if len(found) > 1:
        text += f" ± {statistics.stdev(found):.{digits}f}"
    return text + (f" ({len(found)} of {len(values)})" if len(found) < len(values) else "")


def table(curves: list[Curve], target: float, deadlines: dict[int, float]) -> str:
    lines = [
        f"Target held-out loss {target:.3f}; deadline (sync_deadline) at the "
        f"{DEADLINE_PERCENTILE * 100:.0f}th percentile of client round times: "
        + ", ".join(f"seed {s}: {d:.0f} s" for s, d in sorted(deadlines.items()))
        + ". Mean ± standard deviation over seeds.",
        "",
        "| method | simulated hours to target | final held-out loss | final exact match | "
        "simulated hours in all | updates applied | wasted turns |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        runs = [c for c in curves if c.method == method]
        lines.append(
            f"| {method} | {mean_sd([c.hours_to(target) for c in runs], 2)} | "
            f"{mean_sd([c.loss[-1] for c in runs], 3)} | "
            f"{mean_sd([c.exact_match[-1] for c in runs], 2)} | "
            f"{mean_sd([c.total_hours for c in runs], 2)} | "
            f"{mean_sd([float(c.updates) for c in runs], 0)} | "
            f"{mean_sd([c.wasted for c in runs], 3)} |"
        )
    return "\n".join(lines) + "\n"


def plot(curves: list[Curve], target: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for c in curves:
        first = c.seed == min(x.seed for x in curves if x.method == c.method)
        ax.plot(c.hours, c.loss, color=colors[c.method], alpha=0.8, marker=".",
                label=c.method if first else None)  # fmt: skip
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("held-out loss")
    ax.set_title("Held-out loss against the simulated clock")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run of every part")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--rounds", type=int, help="synchronous rounds (default 60, quick 12)")
    parser.add_argument("--eval-every", type=int, default=5, help="score every Nth round")
    parser.add_argument("--target", type=float, help="held-out loss target")
    parser.add_argument("--reuse", action="store_true", help="keep runs that are finished")
    parser.add_argument("--set", action="append", default=[], help="override, all runs")
    args = parser.parse_args()
    scale = QUICK if args.quick else Scale()
    if args.rounds:
        scale = Scale(**{**scale.__dict__, "rounds": args.rounds})
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    every = min(args.eval_every, 3) if args.quick else args.eval_every

    start = time.perf_counter()
    runs: list[tuple[str, int, Path]] = []
    deadlines: dict[int, float] = {}
    ray_auth.require_token_auth()  # as fedsim does for the instances it starts
    ray.init(include_dashboard=False, runtime_env={"env_vars": WORKER_ENV})
    try:
        for seed in seeds:
            raw = base_config(scale, seed, args.set)
            sync_dir = train(variant(raw, "sync", scale, None), args.reuse)
            adapter_bytes = round_info(sync_dir, 1)["bytes"]["adapter"]
            deadlines[seed] = deadline_seconds(raw, adapter_bytes)
            runs.append(("sync", seed, sync_dir))
            for method in METHODS[1:]:
                runs.append((method, seed, train(variant(raw, method, scale, deadlines[seed]),
                                                 args.reuse)))  # fmt: skip
    finally:
        ray.shutdown()
    trained = time.perf_counter() - start

    curves = [score(run_dir, method, seed, every) for method, seed, run_dir in runs]
    target = args.target or max(c.loss[-1] for c in curves)
    out = Path(config_from_dict(base_config(scale, seeds[0], args.set)).run.output_dir)
    text = table(curves, target, deadlines)
    scoring = time.perf_counter() - start - trained
    text += f"\nTraining {trained / 60:.1f} min, scoring {scoring / 60:.1f} min.\n"
    (out / "results.md").write_text(text)
    plot(curves, target, out / "loss_vs_simulated_hours.png")
    report = write_report([run_dir for _, _, run_dir in runs], out / "report")
    print()
    print(text)
    print(
        f"results: {out / 'results.md'}; plot: {out / 'loss_vs_simulated_hours.png'}; "
        f"report: {report / 'report.md'}"
    )


if __name__ == "__main__":
    main()
