"""Many clients per round: the share of a round spent outside training, and the cost per client.

    python benchmarks/many_clients.py [--per-round 5 50 500] [--rounds 4] [--compare DIR]

Each setting runs `run_experiment` in its own driver process (a fresh Ray): the built-in tiny
model, 1,000 registered clients (iid, `--records` records each), `client.local_steps: 1`, 2
workers of 1 CPU, `--per-round` clients a round. Per setting it prints the median over rounds
2.. (round 1 warms the workers up) of: the round time (metrics.jsonl `seconds`: selection to the
last update folded in); the training time per worker (round.json's per-client `train_seconds`,
summed, over the workers); the share of the round outside training, 1 - training per worker /
round time; and the overhead per client, (round time - training per worker) / clients.

`--compare DIR` runs every setting a second time, interleaved, with the fedsim sources of DIR
(e.g. a `git worktree` of an older commit), so before and after are measured side by side under
the same load. `--profile` runs the largest setting's driver under cProfile and prints its top
functions by own time. Absolute times are noisy on a loaded machine; the load is printed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def load() -> str:
    """The machine's load averages, as `uptime` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def config(per_round: int, registered: int, records: int, rounds: int, workers: int) -> dict:
    """The experiment of one setting, as a raw config."""
    out = tempfile.mkdtemp(prefix="fedsim-many-")
    return {
        "run": {"name": f"many{per_round}", "output_dir": out, "seed": 0, "rounds": rounds},
        "data": {
            "source": "builtin:quickstart",
            "builtin_records": records * registered,
            "cutoff_len": 128,
            "num_clients": registered,
            "partition": {"kind": "iid"},
        },
        "model": {"name_or_path": "tiny", "lora": {"r": 8, "alpha": 16}},
        "client": {"local_steps": 1, "batch_size": 8, "micro_batch_size": 8},
        "server": {"clients_per_round": per_round},
        "cluster": {"num_workers": workers, "cpus_per_worker": 1},
    }


def round_figures(run_dir: Path, record: dict, workers: int) -> dict:
    """One round's time, its training time per worker and what lies outside training."""
    from fedsim import checkpoint

    info_path = run_dir / checkpoint.ROUNDS_DIR / checkpoint.round_name(record["round"])
    info = json.loads((info_path / checkpoint.ROUND_INFO_FILE).read_text())
    train = sum(c["train_seconds"] for c in info["client_results"]) / workers
    seconds = record["seconds"]
    clients = record["num_clients"]
    return {
        "round_s": seconds,
        "train_per_worker_s": train,
        "outside_share": 1 - train / seconds,
        "overhead_ms_per_client": 1000 * (seconds - train) / clients,
    }


def one_setting(args: argparse.Namespace) -> dict:
    """Run one setting in this process; returns the medians over rounds 2.."""
    from fedsim.config import config_from_dict
    from fedsim.driver import run_experiment

    raw = config(args.one, args.registered, args.records, args.rounds, args.workers)
    profile = cProfile.Profile() if args.profile_child else None
    if profile is not None:
        profile.enable()
    result = run_experiment(config_from_dict(raw), log=lambda _: None, show_progress=False)
    if profile is not None:
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue(), file=sys.stderr)
    rounds = [round_figures(result.run_dir, m, args.workers) for m in result.metrics[1:]]
    figures = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    return {"per_round": args.one, **figures}


def run_setting(per_round: int, tree: Path, profile: bool) -> dict:
    """`--one per_round` in a fresh driver process, with the fedsim sources of `tree`."""
    argv = [sys.executable, __file__, "--one", str(per_round), *sys.argv[1:]]
    if profile:
        argv.append("--profile-child")
    env = {**os.environ, "PYTHONPATH": str(tree)}  # Ray's workers inherit the driver's sys.path
    child = subprocess.run(argv, capture_output=True, text=True, cwd=tree, env=env)
    lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
    if child.returncode or not lines:
        sys.exit(f"{per_round} clients failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    if profile:
        print(child.stderr[-12000:])
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-round", type=int, nargs="+", default=[5, 50, 500])
    parser.add_argument("--registered", type=int, default=1000)
    parser.add_argument("--records", type=int, default=8, help="records per client")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compare", type=Path, help="also run with the fedsim sources of DIR")
    parser.add_argument("--profile", action="store_true", help="cProfile the largest setting")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one setting
    parser.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(one_setting(args)), flush=True)
        return

    trees = [("this", HERE)]
    if args.compare is not None:
        trees.append(("compare", args.compare.resolve()))
    print(f"before: {load()}")
    print(
        f"{'tree':>8} {'clients':>8} {'round s':>8} {'train/worker s':>14} "
        f"{'outside training':>16} {'overhead ms/client':>18}"
    )
    for n in args.per_round:
        for name, tree in trees:
            profile = args.profile and n == max(args.per_round) and name == "this"
            r = run_setting(n, tree, profile)
            print(
                f"{name:>8} {n:>8} {r['round_s']:>8.2f} {r['train_per_worker_s']:>14.2f} "
                f"{100 * r['outside_share']:>15.1f}% {r['overhead_ms_per_client']:>18.2f}",
                flush=True,
            )
    print(f"after: {load()}")


if __name__ == "__main__":
    main()
