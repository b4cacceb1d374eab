"""Cost of registered clients: round time, driver memory and checkpoint time at 100 vs 10,000.

    python benchmarks/scale.py [--clients 100 10000] [--per-round 4] [--records 8] [--rounds 6]
    python benchmarks/scale.py --clients 100 10000 100000 --rounds 8   # issue 16
    python benchmarks/scale.py --clients 100 1000000 --rounds 3

Each size runs `run_experiment` in its own driver process (so peak memory and Ray start fresh):
the tiny built-in model, an iid split with `--records` records per client (so a sampled client
holds the same data at every size), the same `--per-round` clients per round and the same local
work. Printed per size: the run's total time; the time from the call to the start of round 1
(preparing the data, writing the run directory, starting Ray and the workers; shards are
tokenised later, block by block, as rounds need them); the median round time over rounds 2..
(round 1 warms the workers up; a round includes waiting for its shard blocks when the previous
round's background tokenising has not finished them); the driver's peak RSS (whole process life,
including preparing the data and tokenising the blocks the rounds needed); its RSS growth over
the rounds; the median checkpoint write time over the round time, and the median time a round
waited for the previous round's checkpoint (written in the background while it trained: the part
of the checkpoint on the critical path) over the round time. Then the ratios of the
largest size to the smallest. Targets: round time ratio <= 1.05, peak RSS growth < 100 MB,
checkpoint < 5% of the round. Absolute times are noisy on a loaded machine; note the load.
From 100,000 generated records on (12,500 clients here), the records are memory-mapped from
`$FEDSIM_CACHE_DIR/data`, written on a size's first run: that run's start-up includes generating
them (seconds per million records), later runs' do not. Run twice to see both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1024 * 1024


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; peak RSS elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def one_size(clients: int, per_round: int, records: int, rounds: int, workers: int) -> dict:
    """Run one experiment in this process; returns its figures."""
    from fedsim.config import config_from_dict
    from fedsim.driver import run_experiment

    out = Path(tempfile.mkdtemp(prefix="fedsim-scale-"))
    raw = {
        "run": {"name": f"scale{clients}", "output_dir": str(out), "seed": 0, "rounds": rounds},
        "data": {
            "source": "builtin:quickstart",
            "builtin_records": records * clients,
            "cutoff_len": 128,
            "num_clients": clients,
            "partition": {"kind": "iid"},
        },
        "model": {"name_or_path": "tiny", "lora": {"r": 8, "alpha": 16}},
        "client": {"local_steps": 5, "batch_size": 8, "micro_batch_size": 8},
        "server": {"clients_per_round": per_round},
        "cluster": {"num_workers": workers, "cpus_per_worker": 1},
    }
    rss_at_round: list[int] = []
    round_ends: list[float] = []

    def log(message: str) -> None:
        if message.startswith("round "):
            rss_at_round.append(rss_bytes())
            round_ends.append(time.perf_counter())

    start = time.perf_counter()
    result = run_experiment(config_from_dict(raw), log=log, show_progress=False)
    seconds = [m["seconds"] for m in result.metrics][1:]
    ckpt = [m["checkpoint_seconds"] / m["seconds"] for m in result.metrics][1:]
    wait = [m["checkpoint_wait_seconds"] / m["seconds"] for m in result.metrics][1:]
    return {
        "clients": clients,
        "total_s": time.perf_counter() - start,
        "start_s": round_ends[0] - start - result.metrics[0]["seconds"],
        "round_s": statistics.median(seconds),
        "checkpoint_share": statistics.median(ckpt),
        "checkpoint_wait_share": statistics.median(wait),
        "checkpoint_s": statistics.median(m["checkpoint_seconds"] for m in result.metrics),
        "peak_rss_mb": peak_rss_bytes() / MB,
        "rss_growth_over_rounds_mb": (rss_at_round[-1] - rss_at_round[0]) / MB,
        "partition_json_kb": (result.run_dir / "partition.json").stat().st_size / 1024,
    }


def run_sizes(script: str, sizes: list[int]) -> list[dict]:
    """Run `script --one N` (plus this process's own arguments) in a fresh driver process per
    size, so that peak memory and Ray start fresh; returns each child's `RESULT` JSON."""
    results = []
    for n in sizes:
        child = subprocess.run(
            [sys.executable, script, "--one", str(n), *sys.argv[1:]],
            capture_output=True,
            text=True,
        )
        lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
        if child.returncode or not lines:
            sys.exit(f"{n} clients failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--records", type=int, default=8, help="records per client")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one size, JSON out
    args = parser.parse_args()
    common = (args.per_round, args.records, args.rounds, args.workers)
    if args.one is not None:
        print("RESULT " + json.dumps(one_size(args.one, *common)), flush=True)
        return

    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = run_sizes(__file__, args.clients)
    print(
        f"{'clients':>8} {'total s':>8} {'start s':>8} {'round s':>8} {'ckpt s':>7} "
        f"{'ckpt/round':>10} {'wait/round':>10} {'peak RSS MB':>11} {'RSS +rounds MB':>14} "
        f"{'partition.json KB':>17}"
    )
    for r in results:
        print(
            f"{r['clients']:>8} {r['total_s']:>8.1f} {r['start_s']:>8.1f} {r['round_s']:>8.2f} "
            f"{r['checkpoint_s']:>7.3f} {100 * r['checkpoint_share']:>9.1f}% "
            f"{100 * r['checkpoint_wait_share']:>9.2f}% "
            f"{r['peak_rss_mb']:>11.0f} {r['rss_growth_over_rounds_mb']:>14.1f} "
            f"{r['partition_json_kb']:>17.0f}"
        )
    small, big = results[0], results[-1]
    print(
        f"{big['clients']} vs {small['clients']} clients: round time x"
        f"{big['round_s'] / small['round_s']:.3f} (target <= 1.05), driver peak RSS "
        f"{big['peak_rss_mb'] - small['peak_rss_mb']:+.0f} MB (target < 100 MB)"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
