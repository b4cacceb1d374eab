"""The FedIT paper's claim in miniature: federated instruction tuning vs local-only tuning.

    python experiments/fedit_vs_local.py [--config experiments/fedit_vs_local.yaml]
        [--clients 3] [--same-compute] [--eval-every 5] [--reuse] [--set KEY=VALUE ...] [--judge]

1. Train the centralized baseline (the upper bound: one client holds every training record, and
   takes as many optimizer steps as the federated run's clients together) and the federated model
   of the config (FedAvg over all clients' data).
2. Train local-only models for a few clients (the largest, the median and the smallest by record
   count) with `server.client_ids: [k]`, on the same partition:
   - `local_cK`: the same rounds and local steps as the federated model, i.e. the same number of
     optimizer steps along the model's path (each federated round averages several clients);
   - with --same-compute also `local_cK_xN`: N times the local steps, N = clients per federated
     round, i.e. the same total training compute as the federated run (a single client cannot
     spread it over workers: these runs take the longest).
3. Score every model with `fedsim eval` on the same all-category held-out test set (held-out
   loss, ROUGE-L, exact match; with --judge also the LLM judge, single grading of every model and
   the federated model pairwise against each local one), and print / write the comparison table
   (`<output_dir>/results.md`) and a `fedsim report` of all runs (`<output_dir>/report/`).

Runs go to `run.output_dir` of the config (runs/fedit_vs_local); `--reuse` keeps finished runs.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import ray
import yaml

from fedsim import baselines, checkpoint
from fedsim.config import apply_override, clients_per_round, config_from_dict
from fedsim.data.pipeline import prepare_data
from fedsim.driver import run_experiment
from fedsim.eval.job import Evaluator, SetResult, evaluate_rounds, latest_round, open_run
from fedsim.execution import WORKER_ENV
from fedsim.report import write_report


def centralized(raw: dict[str, Any], factor: float = 1.0) -> dict[str, Any]:
    """The centralized baseline (`fedsim.baselines.centralized`, what `fedsim run --centralized`
    runs): one client holding every training record, as many optimizer steps in all as the
    federated run's clients together (`factor` times as many when it is not 1)."""
    central = baselines.centralized(config_from_dict(raw), factor).to_dict()
    central["run"]["name"] = "centralized" + (f"_x{factor:g}" if factor != 1 else "")
    return central


def variants(
    raw: dict[str, Any],
    clients: list[int],
    factors: tuple[int, ...],
    per_round: int,
    central_factor: float = 1.0,
) -> list[tuple[str, dict]]:
    """(description, raw config) of the centralized, the federated and each local-only run."""
    budget = "" if central_factor == 1 else f", {central_factor:g}x the steps"
    out = [
        (
            f"all records on one client (upper bound{budget})",
            centralized(raw, central_factor),
        ),
        ("FedAvg over all clients", raw),
    ]
    steps = raw["client"]["local_steps"]
    for k in clients:
        for factor in factors:
            local = copy.deepcopy(raw)
            local["run"]["name"] = f"local_c{k}" + (f"_x{factor}" if factor > 1 else "")
            local["server"]["client_ids"] = [k]
            local["client"]["local_steps"] = steps * factor
            budget = "same steps" if factor == 1 else "same compute"
            out.append((f"client {k} alone, {budget}", local))
    return out


def pick_clients(sizes: list[int], count: int) -> list[int]:
    """The largest, the median and the smallest client by record count (then more from the top)."""
    order = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))
    picks: list[int] = []
    for c in [order[0], order[len(order) // 2], order[-1], *order]:
        if c not in picks:
            picks.append(c)
    return picks[:count]


def eval_rounds(rounds: int, every: int) -> list[int]:
    return sorted({*range(every, rounds + 1, every), rounds})


def fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/fedit_vs_local.yaml")
    parser.add_argument("--clients", type=int, default=3, help="local-only clients to train")
    parser.add_argument(
        "--same-compute",
        action="store_true",
        help="also train each local-only model with the federated run's total compute",
    )
    parser.add_argument(
        "--centralized-factor",
        type=float,
        default=1.0,
        help="the centralized run takes this many times the federated clients' total steps",
    )
    parser.add_argument("--eval-every", type=int, default=5, help="score every Nth round")
    parser.add_argument("--reuse", action="store_true", help="keep runs that are finished")
    parser.add_argument("--set", action="append", default=[], help="override, all runs")
    parser.add_argument("--judge", action="store_true", help="also use the LLM judge (eval.judge)")
    args = parser.parse_args()

    raw = yaml.safe_load(Path(args.config).read_text())
    for assignment in args.set:
        apply_override(raw, assignment)
    fed_cfg = config_from_dict(raw)
    data = prepare_data(fed_cfg.data, fed_cfg.run.seed)
    sizes = [len(c) for c in data.clients]
    categories = data.summary()["clients"]
    clients = pick_clients(sizes, args.clients)
    per_round = clients_per_round(fed_cfg)
    factors = (1, per_round) if args.same_compute else (1,)
    runs = variants(raw, clients, factors, per_round, args.centralized_factor)

    # --- train (one local Ray instance for every run) ---
    start = time.perf_counter()
    trained = 0
    ray.init(include_dashboard=False, runtime_env={"env_vars": WORKER_ENV})
    try:
        for description, run_raw in runs:
            cfg = config_from_dict(run_raw)
            if args.reuse and latest_round(cfg.run_dir) == cfg.run.rounds:
                print(f"reusing {cfg.run_dir}")
                continue
            print(f"training {cfg.run_dir}: {description}", flush=True)
            run_experiment(cfg, overwrite=True, log=lambda _: None, show_progress=False)
            trained += 1
    finally:
        ray.shutdown()
    train_seconds = time.perf_counter() - start

    # --- evaluate every model on the same test set ---
    start = time.perf_counter()
    # eval.* overrides apply to the evaluation of reused runs too (config.yaml holds the old ones)
    judge = [a for a in args.set if a.startswith("eval.")]
    judge += ["eval.judge.single=true"] if args.judge else []
    results: dict[str, SetResult] = {}
    pairwise: dict[str, dict[str, Any]] = {}
    run_dirs = []
    for _, run_raw in runs:
        run = open_run(config_from_dict(run_raw).run_dir, judge)
        run_dirs.append(run.run_dir)
        evaluator = Evaluator(run, log=lambda _: None)
        scored = evaluate_rounds(evaluator, eval_rounds(run.cfg.run.rounds, args.eval_every))
        evaluator.close()
        results[run.cfg.run.name] = scored[-1]
    if args.judge:  # the federated model against each local-only one, both orders
        fed_dir = run_dirs[1]  # after the centralized run
        for local_dir in run_dirs[2:]:
            run = open_run(fed_dir, [*judge, f"eval.judge.baseline={local_dir}"])
            evaluator = Evaluator(run, log=lambda _: None)
            (scored,) = evaluate_rounds(evaluator, [run.cfg.run.rounds])
            evaluator.close()
            pairwise[local_dir.name] = scored.summary["judge"]["pairwise"]
    eval_seconds = time.perf_counter() - start

    # --- the table ---
    out_dir = Path(fed_cfg.run.output_dir)
    lines = [
        f"Test set: {results['federated'].summary['questions']} held-out records, "
        f"{fed_cfg.data.test_per_category} of each category; greedy decoding. "
        f"Training {train_seconds:.0f} s ({trained} runs trained, {len(runs) - trained} "
        f"reused), evaluation {eval_seconds:.0f} s.",
        "",
        "| model | trained on | records | steps on the model's path | total client steps | "
        "test loss | perplexity | ROUGE-L | exact match |" + (" judge |" if args.judge else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if args.judge else ""),
    ]
    rounds = fed_cfg.run.rounds
    for (description, run_raw), name in zip(runs, results, strict=True):
        s = results[name].summary
        ids = run_raw["server"].get("client_ids")
        local_steps = run_raw["client"]["local_steps"]
        records = sum(sizes[c] for c in ids) if ids else sum(sizes)
        total = rounds * local_steps * clients_per_round(config_from_dict(run_raw))
        row = (
            f"| {name} | {description} | {records} | {rounds * local_steps} | {total} | "
            f"{fmt(s['loss'])} | {fmt(s['perplexity'], 2)} | {fmt(s['rouge_l']['mean'])} | "
            f"{fmt(s['exact_match']['mean'])} |"
        )
        if args.judge:
            row += f" {fmt(s['judge']['single']['mean'], 2)} |"
        lines.append(row)
    fed = results["federated"].summary
    lines += ["", "Exact match per category (held-out records):", ""]
    cats = sorted(fed["exact_match"]["by_category"])
    lines.append("| model | " + " | ".join(cats) + " |")
    lines.append("|---|" + "---|" * len(cats))
    for name, result in results.items():
        by_cat = result.summary["exact_match"]["by_category"]
        lines.append(f"| {name} | " + " | ".join(fmt(by_cat[c]["mean"], 2) for c in cats) + " |")
    lines += ["", "Local-only clients' data (records by category):", ""]
    for k in clients:
        mix = ", ".join(f"{c} {n}" for c, n in sorted(categories[str(k)]["categories"].items()))
        lines.append(f"- client {k}: {sizes[k]} records ({mix})")
    lines += ["", "Federated minus centralized and local-only:", ""]
    for name, result in results.items():
        if name == "federated":
            continue
        s = result.summary
        em = fed["exact_match"]["mean"] - s["exact_match"]["mean"]
        lines.append(
            f"- vs {name}: exact match {em:+.3f}, "
            f"ROUGE-L {fed['rouge_l']['mean'] - s['rouge_l']['mean']:+.3f}, "
            f"test loss {fed['loss'] - s['loss']:+.3f}"
            + (
                f", judge win rate {fmt(pairwise[name]['win_rate'])} "
                f"({pairwise[name]['wins']}W {pairwise[name]['losses']}L {pairwise[name]['ties']}T)"
                if name in pairwise
                else ""
            )
        )
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    (out_dir / "results.md").write_text(text)
    report = write_report(run_dirs, out_dir / "report")
    print(f"results: {out_dir / 'results.md'}; report: {report / 'report.md'}")
    for run_dir in run_dirs:
        assert (run_dir / checkpoint.LATEST_FILE).exists()


if __name__ == "__main__":
    main()
