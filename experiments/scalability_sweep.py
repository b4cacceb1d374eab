"""The scalability sweep (issue 6): `experiments/scalability.yaml` at 10 to 10,000 registered
clients and a few clients-per-round settings, then `fedsim report` over all of them.

    python experiments/scalability_sweep.py            # 10, 100, 1,000, 10,000 x 5, 10 per round
    python experiments/scalability_sweep.py --quick    # smoke run: 10 and 1,000 clients, 3 rounds

Each (clients, per round) point is its own `fedsim run` subprocess (a fresh driver and Ray, so
the peak-memory figures are that run's alone), named `sweep_n{clients}_k{per_round}` under
`--output-dir`. The data grows with the clients: `--records-per-client` (15) generated records per
client plus the 80-record test split, so a sampled client holds about as much data, and does the
same local work, at every size; only what the driver and the partition keep per registered client
grows. The pool is fixed (`--workers`, 2) so that more clients per round means more turns per
worker, not more workers. An existing run directory is resumed (a finished one is reused as is);
`--overwrite` redoes it. Finally the sweep table (from the report's "Scalability sweep" section)
is printed; report.md and sweep.png are in `<output-dir>/sweep_report`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "scalability.yaml"
TEST_RECORDS = 80
"""data.test_per_category (10) x the built-in data's 8 categories, held out before the split."""


def run_name(clients: int, per_round: int) -> str:
    return f"sweep_n{clients}_k{per_round}"


def run_point(
    clients: int, per_round: int, args: argparse.Namespace, output_dir: Path
) -> tuple[Path, float]:
    """`fedsim run` one point of the sweep; returns its run directory and wall time."""
    name = run_name(clients, per_round)
    run_dir = output_dir / name
    settings = {
        "run.name": name,
        "run.output_dir": str(output_dir),
        "run.rounds": args.rounds,
        "data.num_clients": clients,
        "data.builtin_records": args.records_per_client * clients + TEST_RECORDS,
        "server.clients_per_round": per_round,
        "cluster.num_workers": args.workers,
    }
    command = [sys.executable, "-m", "fedsim.cli", "run", str(EXPERIMENT)]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    if args.overwrite:
        command.append("--overwrite")
    elif run_dir.exists():
        command.append("--resume")
    print(f"--- {clients} clients, {per_round} per round: {run_dir}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{name} failed (exit {done.returncode}); see its output above")
    return run_dir, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1_000, 10_000])
    parser.add_argument("--per-round", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--records-per-client", type=int, default=15)
    parser.add_argument("--workers", type=int, default=2, help="cluster.num_workers")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs")
    parser.add_argument("--overwrite", action="store_true", help="redo existing runs")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 10 and 1,000 clients, 5 per round, 3 rounds",
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.per_round, args.rounds = [10, 1_000], [5], 3
    if args.records_per_client < 1:
        parser.error("--records-per-client must be >= 1 (Dirichlet min_size 1)")

    output_dir = args.output_dir.resolve()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    run_dirs = []
    for per_round in args.per_round:
        for clients in args.clients:
            run_dir, seconds = run_point(clients, per_round, args, output_dir)
            print(f"    {seconds:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)
            run_dirs.append(run_dir)

    report = output_dir / "sweep_report"
    command = [sys.executable, "-m", "fedsim.cli", "report", *map(str, run_dirs)]
    subprocess.run([*command, "--out", str(report)], cwd=ROOT, check=True)
    text = (report / "report.md").read_text()
    print(text[text.index("## Scalability sweep") :] if "## Scalability sweep" in text else text)
    print(f"report: {report / 'report.md'}, plot: {report / 'sweep.png'}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
