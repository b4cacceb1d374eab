"""The `fedsim` command: a dispatch table of plain functions, one per subcommand.

Exit codes: 0 success, 2 bad input (one line per problem on stderr, naming the field or file),
1 unexpected failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fedsim.checkpoint import CheckpointWriteError
from fedsim.config import load_config
from fedsim.errors import FedsimInputError


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.driver import run_experiment

    cfg = load_config(args.config, args.set)
    try:
        result = run_experiment(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            allow_config_change=args.allow_config_change,
            show_progress=sys.stderr.isatty(),  # a bar in a terminal, not in CI logs
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; continue with: fedsim run {args.config} --resume",
            file=sys.stderr,
        )
        return 130
    print(f"done: {result.run_dir} (latest round {result.last_round})")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from fedsim.data.pipeline import format_partition_table, prepare_data

    cfg = load_config(args.config, args.set)
    data = prepare_data(cfg.data, cfg.run.seed)
    print(format_partition_table(data.summary()))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    load_config(args.config, args.set)
    print(f"{args.config}: ok")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedsim.report import write_report

    out = args.out or (args.runs[0] if len(args.runs) == 1 else "report")
    path = write_report(args.runs, out)
    print(f"wrote {path} and {path.with_name('loss.png')}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "run": (cmd_run, "run (or --resume) an experiment"),
    "partition": (cmd_partition, "build the client split and print each client's size and mix"),
    "validate": (cmd_validate, "check a config file without running anything"),
    "report": (cmd_report, "loss curves of one run, or several side by side"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == "report":
            p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
            p.add_argument(
                "--out", help="output folder (default: the run directory, or ./report for several)"
            )
            continue
        p.add_argument("config", help="experiment YAML file")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set client.lr=1e-4 (repeatable)",
        )
        if name == "run":
            p.add_argument(
                "--resume", action="store_true", help="continue from the newest intact round"
            )
            p.add_argument(
                "--overwrite", action="store_true", help="replace an existing run directory"
            )
            p.add_argument(
                "--allow-config-change",
                action="store_true",
                help="with --resume, accept a config that differs from the checkpoint's",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler, _ = COMMANDS[args.command]
    try:
        return handler(args)
    except FedsimInputError as err:
        for line in str(err).splitlines():
            print(f"fedsim: error: {line}", file=sys.stderr)
        return 2
    except CheckpointWriteError as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
