"""The `fedsim` command line: one plain function per subcommand, found in a table.

Exit codes: 0 success, 2 bad input (one line per problem on stderr, naming the field or file),
1 unexpected failure, 130 interrupted. By default only fedsim's own lines are printed;
`--verbose` lets Ray's, DeepSpeed's and transformers' logs through (fedsim.console).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from fedsim import console
from fedsim.checkpoint import CheckpointWriteError
from fedsim.config import load_config
from fedsim.errors import FedsimInputError

DESCRIPTION = (
    "Simulate federated instruction tuning of a language model on your machine or a Ray "
    "cluster: virtual clients LoRA-tune a shared base model on their own instructions, and a "
    "server aggregates their adapters, round by round."
)
EPILOG = """\
start here:
  fedsim run experiments/quickstart.yaml   train (a few minutes on a laptop CPU)
  fedsim runs                              list the runs in runs/ and their state
  fedsim eval runs/quickstart              score the newest round on held-out questions
  fedsim report runs/quickstart            write report.md and plots

'fedsim COMMAND --help' shows a command's options; docs/getting-started.md walks through it all.
"""
MORE_ROUNDS = 10
"""How many more rounds the resume command that `fedsim run` suggests at the end asks for."""
ALIGN_COMMENTS_UP_TO = 48


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.driver import run_experiment

    cfg = load_config(args.config, args.set)
    if args.centralized:
        from fedsim.baselines import centralized

        cfg = centralized(cfg)
    try:
        result = run_experiment(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            allow_config_change=args.allow_config_change,
            show_progress=sys.stderr.isatty(),  # a bar in a terminal, not in CI logs
            exit_follows=True,
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: {resume_command(args)}", file=sys.stderr)
        return 130
    print(f"done: {result.run_dir} (latest round {result.last_round})")
    unit = "server steps" if cfg.server.mode == "async" else "rounds"
    print(next_commands(args, result.run_dir, result.last_round, unit))
    if result.ray_left_running:  # the run's files are durable: end Ray with the process
        from fedsim.execution import end_process

        end_process(0)
    return 0


def resume_command(args: argparse.Namespace, rounds: int | None = None) -> str:
    """The command line that continues this run: the same config and overrides, `--resume`;
    with `rounds`, its `run.rounds` set to that (replacing an override of it)."""
    words = ["fedsim", "run", args.config]
    for assignment in args.set:
        if rounds is None or assignment.partition("=")[0].strip() != "run.rounds":
            words += ["--set", assignment]
    if rounds is not None:
        words += ["--set", f"run.rounds={rounds}"]
    if args.allow_config_change:
        words.append("--allow-config-change")
    if getattr(args, "centralized", False):
        words.append("--centralized")
    return shlex.join([*words, "--resume"])


def next_commands(
    args: argparse.Namespace, run_dir: Path, last_round: int, unit: str = "rounds"
) -> str:
    """What `fedsim run` prints last: the commands to evaluate, report and continue the run,
    each ready to paste (the explanation is a shell comment). `unit`: what `run.rounds` counts
    (an asynchronous run's are server steps)."""
    run = shlex.quote(str(run_dir))
    lines = [
        (f"fedsim eval {run}", "score the newest round on the held-out questions"),
        (f"fedsim report {run}", f"write {run_dir / 'report' / 'report.md'} with plots"),
        (resume_command(args, last_round + MORE_ROUNDS), f"{MORE_ROUNDS} more {unit}"),
    ]
    # comments line up, except after a command too long to wait for
    width = max((len(c) for c, _ in lines if len(c) <= ALIGN_COMMENTS_UP_TO), default=0)
    return "next:\n" + "\n".join(f"  {c.ljust(width)}  # {why}" for c, why in lines)


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


def cmd_eval(args: argparse.Namespace) -> int:
    from fedsim import checkpoint
    from fedsim.eval.job import (
        Evaluator,
        evaluate_rounds,
        latest_round,
        open_run,
        parse_rounds,
        wait_for_first_round,
    )
    from fedsim.eval.job import watch as watch_run

    if args.personalized:
        return _eval_personalized(args)
    if args.round is not None or args.finetune_steps is not None:
        raise FedsimInputError("--round and --finetune-steps go with --personalized")
    if args.watch:  # may start together with the trainer, before the run directory exists
        try:
            wait_for_first_round(Path(args.run_dir), poll=1.0, timeout=args.timeout)
        except TimeoutError as err:
            print(f"fedsim: {err}", file=sys.stderr)
            return 1
    run = open_run(args.run_dir, args.set)
    if args.rounds:
        rounds = parse_rounds(args.rounds)
    elif args.all:
        rounds = checkpoint.list_rounds(run.run_dir)
    elif not args.watch:
        rounds = [latest_round(run.run_dir)] if latest_round(run.run_dir) else []
    if not args.watch and not rounds:
        raise FedsimInputError(f"{run.run_dir} has no complete round to evaluate yet")
    evaluator = Evaluator(run, force=args.force)
    try:
        if args.watch:
            if args.nice:
                os.nice(args.nice)  # the trainer beside us keeps the CPU when both want it
            watch_run(evaluator, timeout=args.timeout)
        else:
            evaluate_rounds(evaluator, rounds)
    except TimeoutError as err:
        print(f"fedsim: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; finished rounds keep their results", file=sys.stderr)
        return 130
    finally:
        evaluator.close()
    if evaluator.judge_errors:
        for error in evaluator.judge_errors:
            print(f"fedsim: judge request failed: {error}", file=sys.stderr)
        print(
            "fedsim: failed judgments are recorded as errors and excluded; rerun to retry them "
            "(successful ones are cached)",
            file=sys.stderr,
        )
        return 1
    return 0


def _eval_personalized(args: argparse.Namespace) -> int:
    """`fedsim eval RUN_DIR --personalized`: one round, each client on its own held-out slice."""
    from fedsim.eval.job import open_run
    from fedsim.eval.personalized import evaluate_personalized

    if args.rounds or args.all or args.watch:
        raise FedsimInputError("--personalized scores one round: choose it with --round N")
    if args.round is not None and args.round < 1:
        raise FedsimInputError(f"--round: rounds are numbered from 1, got {args.round}")
    run = open_run(args.run_dir, args.set)
    evaluate_personalized(run, args.round, args.finetune_steps or 0)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fedsim.eval.job import answer_prompts, open_run

    overrides = []
    if args.max_new_tokens is not None:
        overrides.append(f"eval.generation.max_new_tokens={args.max_new_tokens}")
    if args.temperature is not None:
        overrides.append(f"eval.generation.temperature={args.temperature}")
    run = open_run(args.run_dir, overrides)
    if args.prompt is not None:
        prompts: Iterator[str] = iter([args.prompt])
    elif not sys.stdin.isatty():
        prompts = iter([sys.stdin.read()])
    else:
        prompts = _interactive()
    for answer in answer_prompts(run, args.round, prompts):
        print(answer, flush=True)
    return 0


def _interactive() -> Iterator[str]:
    """Prompts typed at a terminal, until an empty line or end of input."""
    print("type a prompt (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line


def cmd_runs(args: argparse.Namespace) -> int:
    from fedsim.runs import find_runs, format_runs_table, read_run

    folder = Path(args.output_dir)
    found = find_runs(folder)
    if not found:
        print(f"no runs in {folder}")
        return 0
    print(format_runs_table([read_run(p) for p in found]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedsim import tracking
    from fedsim.report import write_report

    out = write_report([Path(r) for r in args.runs], Path(args.out) if args.out else None)
    tracking.log_report([Path(r) for r in args.runs], out)  # plots to MLflow/W&B, if configured
    print(f"report: {out / 'report.md'}")
    return 0


# --- arguments of each command ----------------------------------------------------------------


def _set_argument(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="experiment YAML file (see experiments/)")
    _set_argument(p, "client.lr=1e-4")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest intact round")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume, accept a config that differs from the checkpoint's",
    )
    p.add_argument(
        "--centralized",
        action="store_true",
        help="run CONFIG's centralized baseline instead (the upper bound): every training record "
        "on one client, as many steps a round as the round's clients together, the same test "
        "split; the run is named <run.name>_centralized",
    )


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (runs/<name>)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--rounds", help="rounds to score, e.g. 3,5 or 2-4 (default: the latest)")
    which.add_argument("--all", action="store_true", help="score every round")
    which.add_argument(
        "--watch",
        action="store_true",
        help="score each new round as the trainer writes it; exit when the run is finished",
    )
    _set_argument(p, "eval.question_sets=[test,vicuna]")
    p.add_argument("--force", action="store_true", help="redo results that are up to date")
    p.add_argument(
        "--timeout", type=float, help="with --watch: give up after this many seconds (exit 1)"
    )
    p.add_argument(
        "--nice", type=int, default=10, help="with --watch: lower this process's CPU priority"
    )
    p.add_argument(
        "--personalized",
        action="store_true",
        help="score each client on its own held-out slice (data.test_per_client) with the global "
        "model and the one it would use (FedSA-LoRA: its own B); writes "
        "rounds/round_N/eval/personalized.json",
    )
    p.add_argument("--round", type=int, help="with --personalized: the round (default: latest)")
    p.add_argument(
        "--finetune-steps",
        type=int,
        metavar="K",
        help="with --personalized: also score 'FedAvg + local fine-tune', K local steps from the "
        "round's global adapter on each client's own records",
    )


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (runs/<name>)")
    p.add_argument(
        "--round", type=int, help="round whose adapter answers (default: the latest; 0: the base)"
    )
    p.add_argument("--prompt", help="the instruction (default: stdin, or a prompt loop)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, help="0 decodes greedily")


def _runs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "output_dir",
        nargs="?",
        metavar="OUTPUT_DIR",
        default="runs",
        help="the folder that holds the run directories (run.output_dir; default: runs)",
    )


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories; several are compared"
    )
    p.add_argument(
        "--out", help="output folder (default: RUN_DIR/report, or ./report for several runs)"
    )


Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """One subcommand: its function, a one-line summary, its arguments, and an example."""

    handler: Handler
    summary: str
    arguments: Callable[[argparse.ArgumentParser], None]
    example: str


COMMANDS: dict[str, Command] = {
    "run": Command(
        cmd_run,
        "train an experiment, or continue one with --resume",
        _run_arguments,
        "fedsim run experiments/quickstart.yaml --set run.rounds=5 --overwrite\n"
        "  fedsim run experiments/quickstart.yaml --set run.rounds=15 --resume",
    ),
    "runs": Command(
        cmd_runs,
        "list the runs in a folder: rounds done, strategy, clients, losses, and whether each "
        "is finished, resumable or damaged",
        _runs_arguments,
        "fedsim runs\n  fedsim runs ~/fedsim-runs",
    ),
    "partition": Command(
        cmd_partition,
        "build the client split and print each client's size and task mix",
        _config_arguments,
        "fedsim partition experiments/quickstart.yaml --set data.partition.alpha=0.1",
    ),
    "validate": Command(
        cmd_validate,
        "check a config file without running anything",
        _config_arguments,
        "fedsim validate experiments/quickstart.yaml",
    ),
    "eval": Command(
        cmd_eval,
        "score round checkpoints on held-out questions (loss, ROUGE-L, exact match, LLM judge)",
        _eval_arguments,
        "fedsim eval runs/quickstart --all",
    ),
    "generate": Command(
        cmd_generate,
        "answer a prompt with a round's adapter",
        _generate_arguments,
        'fedsim generate runs/quickstart --prompt "Sort these numbers: 5 2 9"',
    ),
    "report": Command(
        cmd_report,
        "write report.md and plots for a run, or compare several runs",
        _report_arguments,
        "fedsim report runs/quickstart runs/prox --out comparison",
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse with fedsim's bad-input contract: one `fedsim: error:` line and exit 2 (instead
    of argparse's usage block), naming the command so `--help` is one step away."""

    def error(self, message: str) -> NoReturn:
        print(f"fedsim: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _common_arguments() -> argparse.ArgumentParser:
    """Options every command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Ray's, DeepSpeed's and transformers' own logs (for debugging)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter  # keeps the examples' line breaks
    parser = _Parser(
        prog="fedsim", description=_wrap(DESCRIPTION), epilog=EPILOG, formatter_class=raw
    )
    sub = parser.add_subparsers(
        title="commands", dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )
    common = _common_arguments()
    for name, command in COMMANDS.items():
        examples = "examples" if "\n" in command.example else "example"
        command.arguments(
            sub.add_parser(
                name,
                help=command.summary,
                description=_wrap(command.summary[0].upper() + command.summary[1:] + "."),
                epilog=f"{examples}:\n  {command.example}",
                formatter_class=raw,
                parents=[common],
            )
        )
    return parser


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=88)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        console.set_verbose(True)
    handler = COMMANDS[args.command].handler
    try:
        return handler(args)
    except FedsimInputError as err:
        for line in str(err).splitlines():
            print(f"fedsim: error: {line}", file=sys.stderr)
        return 2
    except CheckpointWriteError as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `fedsim partition ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
