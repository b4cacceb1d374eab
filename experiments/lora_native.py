"""LoRA-native aggregation and personalization in miniature (issue 14's experiment), one command.

    python experiments/lora_native.py [--seeds 0,1,2] [--rounds 30] [--methods all]
        [--finetune-steps 20] [--out runs/lora_native] [--reuse] [--set KEY=VALUE ...] [--quick]

The testbed is experiments/quickstart.yaml's (the built-in tiny model and generated tasks) with
20 clients split by a Dirichlet draw over categories with alpha 0.1, LoRA rank 16 on q/k/v/o, a
client profile giving the clients ranks 4, 8 and 16 in turn (client i: (4, 8, 16)[i % 3]), 10
held-out records per category for the global model and a fifth of each client's records as its
own held-out slice (`data.test_per_client: 0.2`). Methods (`--methods`, comma-separated keys):

| key | method | run |
|---|---|---|
| fedavg | FedAvg | every client at rank 16 (the homogeneous reference) |
| hetlora | HetLoRA | FedAvg with the 4/8/16 profile (zero-padding) |
| flora | FLoRA | `server.strategy: flora`, 4/8/16 |
| flexlora | FlexLoRA | `server.strategy: flexlora`, 4/8/16 |
| ffa_lora | FFA-LoRA | `server.strategy: ffa_lora`, 4/8/16 |
| fedsa_lora | FedSA-LoRA | `fedsa_lora`, 4/8/16; personalized: each client's own B |
| fedavg_ft | FedAvg + local fine-tune | fedavg's run; personalized: --finetune-steps K steps |

For each method and seed: train (one Ray instance for every run), score the last round's global
adapter on the held-out records (`fedsim eval`: loss, exact match), score every client on its own
slice (`fedsim eval --personalized`: the personalized model where the method has one, else the
global model), and read uplink and downlink bytes and seconds per round from round.json. The
table (mean ± sample standard deviation over the seeds) goes to `<out>/results.md`, with a
`fedsim report` of the first seed's runs (global vs personalized loss per client) in
`<out>/report/`. Runs are `<out>/<method>_s<seed>`; an existing run directory is never replaced:
`--reuse` keeps finished runs and resumes unfinished ones.

`--quick` shrinks everything (a smaller tiny model, 6 clients, 2 rounds, ranks 1/2/4, one seed)
for a smoke test of the whole pipeline in a minute or two.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml

from fedsim import checkpoint
from fedsim.config import apply_override, config_from_dict
from fedsim.driver import run_experiment
from fedsim.eval.job import Evaluator, evaluate_rounds, latest_round, open_run
from fedsim.eval.personalized import GLOBAL, OWN_B, evaluate_personalized
from fedsim.execution import WORKER_ENV
from fedsim.report import write_report

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "experiments/quickstart.yaml"
RANKS = (4, 8, 16)
QUICK_RANKS = (1, 2, 4)


@dataclass(frozen=True)
class Method:
    """One row of the table: how its run differs from the base config, and which model is its
    personalized one."""

    label: str
    strategy: str
    heterogeneous: bool
    """Clients train ranks from the profile (else all at model.lora.r)."""
    finetune: bool = False
    """Personalized by local fine-tuning; trains no run of its own (it fine-tunes fedavg's)."""

    def run_key(self, key: str) -> str:
        return "fedavg" if self.finetune else key


METHODS: dict[str, Method] = {
    "fedavg": Method("FedAvg", "fedavg", heterogeneous=False),
    "hetlora": Method("HetLoRA", "fedavg", heterogeneous=True),
    "flora": Method("FLoRA", "flora", heterogeneous=True),
    "flexlora": Method("FlexLoRA", "flexlora", heterogeneous=True),
    "ffa_lora": Method("FFA-LoRA", "ffa_lora", heterogeneous=True),
    "fedsa_lora": Method("FedSA-LoRA", "fedsa_lora", heterogeneous=True),
    "fedavg_ft": Method("FedAvg + local fine-tune", "fedavg", heterogeneous=False, finetune=True),
}

COLUMNS: tuple[tuple[str, str, int, bool], ...] = (
    # (key, header, digits, higher is better)
    ("global_loss", "global held-out loss", 3, False),
    ("global_exact", "global exact match", 3, True),
    ("pers_mean_loss", "personalized mean loss", 3, False),
    ("pers_worst_loss", "personalized worst-decile loss", 3, False),
    ("uplink_mb", "uplink MB/round", 3, False),
    ("downlink_mb", "downlink MB/round", 3, False),
    ("seconds", "seconds/round", 1, False),
)


# ------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------


def profile_text(ranks: Sequence[int], num_clients: int) -> str:
    """A client profile giving client i the rank ranks[i % len(ranks)]."""
    classes = {f"r{r}": {"lora_rank": r} for r in ranks}
    clients = {i: f"r{ranks[i % len(ranks)]}" for i in range(num_clients)}
    return yaml.safe_dump({"classes": classes, "clients": clients}, sort_keys=False)


def base_config(out: Path, rounds: int, quick: bool) -> dict[str, Any]:
    """The testbed: quickstart.yaml with the experiment's data split, rank and held-out slices
    (and, with `quick`, everything shrunk)."""
    raw = yaml.safe_load(BASE_CONFIG.read_text())
    raw["run"].update({"output_dir": str(out), "rounds": rounds})
    raw["data"].update({"num_clients": 20, "test_per_client": 0.2})
    raw["data"]["partition"] = {"kind": "dirichlet", "alpha": 0.1, "min_size": 20}
    raw["model"]["lora"].update({"r": 16, "alpha": 32})
    # FLoRA refuses the per-round probe (it runs before a round's merge reaches the worker);
    # every method is scored the same way afterwards instead
    raw["eval"]["probe_per_category"] = 0
    if quick:
        raw["data"].update(
            {"builtin_records": 400, "num_clients": 6, "test_per_category": 2, "cutoff_len": 160}
        )
        raw["data"]["partition"]["min_size"] = 10
        raw["model"]["tiny"] = {
            "vocab_size": 512,
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "pretrain_steps": 30,
        }
        raw["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
        raw["client"].update({"local_steps": 3, "batch_size": 4, "micro_batch_size": 2})
        raw["server"]["clients_per_round"] = 3
        raw["cluster"] = {"num_workers": 1, "cpus_per_worker": 1}
        raw["eval"]["generation"]["max_new_tokens"] = 6
    return raw


def run_config(
    base: dict[str, Any], key: str, seed: int, profile: Path, overrides: Sequence[str]
) -> dict[str, Any]:
    """The raw config of method `key`'s run with `seed`."""
    method = METHODS[key]
    raw = copy.deepcopy(base)
    raw["run"].update({"name": f"{key}_s{seed}", "seed": seed})
    raw["server"]["strategy"] = method.strategy
    if method.heterogeneous:
        raw["client"]["profile"] = str(profile)
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


# ------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------


def round_costs(run_dir: Path) -> dict[str, float]:
    """Mean uplink and downlink MB and seconds per round, from every round's round.json."""
    infos = []
    for r in checkpoint.list_rounds(run_dir):
        path = run_dir / checkpoint.ROUNDS_DIR / checkpoint.round_name(r) / "round.json"
        infos.append(json.loads(path.read_text()))
    n = len(infos)
    return {
        "uplink_mb": sum(i["bytes"]["uplink"] for i in infos) / n / 1e6,
        "downlink_mb": sum(i.get("bytes_downlink", 0) for i in infos) / n / 1e6,
        "seconds": sum(i["seconds"] for i in infos) / n,
    }


def personal_model(key: str, models: dict[str, Any], finetune_steps: int) -> dict[str, Any]:
    """The model a method's clients would use: FedSA-LoRA's own B, the local fine-tune, or the
    global model (every other method)."""
    if METHODS[key].finetune:
        return models[f"finetune_{finetune_steps}"]
    if METHODS[key].strategy == "fedsa_lora":
        return models[OWN_B]
    return models[GLOBAL]


def measure(run_dir: Path, key: str, finetune_steps: int) -> dict[str, float]:
    """One (method, seed) cell of every column."""
    run = open_run(run_dir)
    rounds = latest_round(run_dir)
    evaluator = Evaluator(run, log=lambda _: None)
    try:
        (scored,) = evaluate_rounds(evaluator, [rounds])
    finally:
        evaluator.close()
    steps = finetune_steps if METHODS[key].finetune else 0
    result = evaluate_personalized(run, rounds, steps, log=lambda _: None)
    personal = personal_model(key, result["models"], finetune_steps)
    return {
        "global_loss": scored.summary["loss"],
        "global_exact": scored.summary["exact_match"]["mean"],
        "pers_mean_loss": personal["mean_loss"],
        "pers_worst_loss": personal["worst_decile_loss"],
        **round_costs(run_dir),
    }


# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------


def mean_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def cell(values: Sequence[float], digits: int) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    mean, spread = mean_spread(values)
    return f"{mean:.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")


def results_table(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """Markdown: one row per method, one column per measurement, mean ± spread over seeds."""
    lines = [
        "| method | " + " | ".join(header for _, header, _, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for key, cells in results.items():
        row = [cell([c[col] for c in cells], digits) for col, _, digits, _ in COLUMNS]
        lines.append(f"| {METHODS[key].label} | " + " | ".join(row) + " |")
    return lines


def best_lines(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """Per column, the best method by its mean and its margin over the runner-up."""
    lines = []
    for col, header, digits, higher in COLUMNS:
        means = {
            k: statistics.fmean(c[col] for c in cells) for k, cells in results.items() if cells
        }
        if len(means) < 2:
            continue
        ranked = sorted(means, key=lambda k: means[k], reverse=higher)
        first, second = ranked[0], ranked[1]
        lines.append(
            f"- {header}: best {METHODS[first].label} ({means[first]:.{digits}f}), then "
            f"{METHODS[second].label} ({means[second]:.{digits}f}, "
            f"{means[second] - means[first]:+.{digits}f})"
        )
    return lines


# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------


def train(cfg_raw: dict[str, Any], reuse: bool, log: Callable[[str], None]) -> Path:
    """Train one run, or reuse (with --reuse: resume) an existing one; never replace one."""
    cfg = config_from_dict(cfg_raw)
    if cfg.run_dir.exists():
        if not reuse:
            raise SystemExit(
                f"{cfg.run_dir} exists; pass --reuse to keep it (or choose another --out)"
            )
        if latest_round(cfg.run_dir) >= cfg.run.rounds:
            log(f"reusing {cfg.run_dir}")
            return cfg.run_dir
        log(f"resuming {cfg.run_dir}")
        run_experiment(cfg, resume=True, log=lambda _: None, show_progress=False)
        return cfg.run_dir
    log(f"training {cfg.run_dir}")
    run_experiment(cfg, log=lambda _: None, show_progress=False)
    return cfg.run_dir


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--methods", default="all", help=f"comma-separated keys of {', '.join(METHODS)}, or all"
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=20,
        help="local steps of FedAvg + local fine-tune (default: one round's local steps)",
    )
    parser.add_argument("--out", default="runs/lora_native", help="folder of the runs and table")
    parser.add_argument("--reuse", action="store_true", help="keep (or resume) existing runs")
    parser.add_argument("--set", action="append", default=[], help="override, every run")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: everything shrunk, seconds per run"
    )
    args = parser.parse_args(argv)
    keys = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected keys of {', '.join(METHODS)}")
    args.methods = keys
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.seeds = args.seeds[:1]
        args.rounds = min(args.rounds, 2)
        args.finetune_steps = min(args.finetune_steps, 2)
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the experiment; returns the path of results.md."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = base_config(out, args.rounds, args.quick)
    profile = out / "profile_ranks.yaml"
    profile.write_text(
        profile_text(QUICK_RANKS if args.quick else RANKS, base["data"]["num_clients"])
    )
    log: Callable[[str], None] = lambda m: print(m, flush=True)  # noqa: E731

    # --- train: every run a method needs, one Ray instance for all (a caller's, if started) ---
    start = time.perf_counter()
    needed = sorted({METHODS[k].run_key(k) for k in args.methods}, key=list(METHODS).index)
    run_dirs: dict[tuple[str, int], Path] = {}
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, runtime_env={"env_vars": WORKER_ENV})
    try:
        for seed in args.seeds:
            for key in needed:
                raw = run_config(base, key, seed, profile, args.set)
                run_dirs[key, seed] = train(raw, args.reuse, log)
    finally:
        if started_ray:
            ray.shutdown()
    train_seconds = time.perf_counter() - start

    # --- evaluate: the global model, then each client on its own slice ---
    start = time.perf_counter()
    results: dict[str, list[dict[str, float]]] = {k: [] for k in args.methods}
    for seed in args.seeds:
        for key in args.methods:
            log(f"evaluating {key} (seed {seed})")
            run_dir = run_dirs[METHODS[key].run_key(key), seed]
            results[key].append(measure(run_dir, key, args.finetune_steps))
    eval_seconds = time.perf_counter() - start

    # --- the table ---
    command = "python experiments/lora_native.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    num_clients = base["data"]["num_clients"]
    ranks = QUICK_RANKS if args.quick else RANKS
    lines = [
        f"`{command.strip()}`",
        "",
        f"{num_clients} clients (Dirichlet alpha 0.1), LoRA rank {base['model']['lora']['r']} "
        f"with client ranks {'/'.join(map(str, ranks))} for all but FedAvg, {args.rounds} rounds, "
        f"seeds {', '.join(map(str, args.seeds))} (mean ± sample standard deviation). Global: the "
        f"last round on {base['data']['test_per_category']} held-out records per category. "
        "Personalized: each client on its own held-out fifth of its records, with FedSA-LoRA's "
        f"own B, the local fine-tune ({args.finetune_steps} steps) or else the global model; mean "
        "over clients and mean of the worst 10%. Bytes and seconds per round from round.json. "
        f"Training {train_seconds:.0f} s, evaluation {eval_seconds:.0f} s.",
        "",
        *results_table(results),
        "",
        "Best per column (by the mean):",
        "",
        *best_lines(results),
    ]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    (out / "results.md").write_text(text)
    first = [run_dirs[METHODS[k].run_key(k), args.seeds[0]] for k in needed]
    report = write_report(first, out / "report")
    log(f"results: {out / 'results.md'}; report of seed {args.seeds[0]}: {report / 'report.md'}")
    return out / "results.md"


if __name__ == "__main__":
    main()
