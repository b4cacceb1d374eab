"""Asynchronous training at 100 vs 10,000 registered clients: driver memory, and how much of a
server step's real time is training.

    python benchmarks/async_scale.py [--clients 100 10000] [--concurrency 100] [--buffer 10]
        [--records 8] [--steps 8] [--workers 2]

Each size runs `run_experiment` with `server.mode: async` in its own driver process (so peak
memory and Ray start fresh): the tiny built-in model, an iid split with `--records` records per
client, `--concurrency` clients in flight, K = `--buffer`, device speeds log-normal (sigma 1).
Printed per size: the run's total time, the median real seconds of a server step over steps 2..
(step 1 trains the first `concurrency` clients at once), the driver's peak RSS, and the training
share: the training seconds of every dispatch the steps launched (round.json's
`launched_train_seconds`), divided by the workers, over the steps' real seconds. 100 % would
mean the driver adds nothing; the rest is scheduling, moving adapters, folding and checkpoints.
Then the largest size against the smallest. Targets (issue 15): driver peak RSS within 100 MB,
and steps dominated by training. Absolute times are noisy on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# run as `python benchmarks/async_scale.py`: benchmarks/ is on the path
from scale import MB, peak_rss_bytes, run_sizes


def peak_rss_mb() -> float:
    return peak_rss_bytes() / MB


def one_size(clients: int, args: argparse.Namespace) -> dict:
    """Run one asynchronous experiment in this process; returns its figures."""
    from fedsim.config import config_from_dict
    from fedsim.driver import run_experiment

    out = Path(tempfile.mkdtemp(prefix="fedsim-async-scale-"))
    raw = {
        "run": {"name": f"async{clients}", "output_dir": str(out), "seed": 0, "rounds": args.steps},
        "data": {
            "source": "builtin:quickstart",
            "builtin_records": args.records * clients,
            "cutoff_len": 128,
            "num_clients": clients,
            "partition": {"kind": "iid"},
        },
        "model": {"name_or_path": "tiny", "lora": {"r": 8, "alpha": 16}},
        "client": {"local_steps": 5, "batch_size": 8, "micro_batch_size": 8},
        "server": {
            "mode": "async",
            "concurrency": min(args.concurrency, clients),
            "buffer_size": args.buffer,
        },
        "system": {"enabled": True, "speed_sigma": 1.0},
        "cluster": {"num_workers": args.workers, "cpus_per_worker": 1},
    }
    start = time.perf_counter()
    result = run_experiment(config_from_dict(raw), log=lambda _: None, show_progress=False)
    total = time.perf_counter() - start
    step_seconds = [m["seconds"] for m in result.metrics]
    training = 0.0  # what the workers spent training the dispatches each step launched
    for m in result.metrics:
        path = result.run_dir / f"rounds/round_{m['round']:04d}/round.json"
        info = json.loads(path.read_text())
        training += info["async"]["launched_train_seconds"]
    return {
        "clients": clients,
        "total_s": total,
        "step_s": statistics.median(step_seconds[1:] or step_seconds),
        "peak_rss_mb": peak_rss_mb(),
        "training_share": training / args.workers / sum(step_seconds),
        "dispatched": result.metrics[-1]["dispatched"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--buffer", type=int, default=10)
    parser.add_argument("--records", type=int, default=8, help="records per client")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one size, JSON out
    args = parser.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(one_size(args.one, args)), flush=True)
        return

    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = run_sizes(__file__, args.clients)
    print(
        f"{'clients':>8} {'total s':>8} {'step s':>7} {'peak RSS MB':>11} "
        f"{'training share':>14} {'dispatched':>10}"
    )
    for r in results:
        print(
            f"{r['clients']:>8} {r['total_s']:>8.1f} {r['step_s']:>7.2f} {r['peak_rss_mb']:>11.0f}"
            f" {100 * r['training_share']:>13.0f}% {r['dispatched']:>10}"
        )
    small, big = results[0], results[-1]
    print(
        f"{big['clients']} vs {small['clients']} clients: driver peak RSS "
        f"{big['peak_rss_mb'] - small['peak_rss_mb']:+.0f} MB (target < 100 MB), step time x"
        f"{big['step_s'] / small['step_s']:.2f}"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
