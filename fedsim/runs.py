"""`fedsim runs`: one line per run directory, so a person with fifty runs finds theirs.

Each row is read from what the run wrote (config.yaml, metrics.jsonl, eval.jsonl via
`fedsim.report.load_run`; rounds/ and `latest` via `fedsim.checkpoint`); nothing is loaded into a
model. A run's state:

- **finished**: its newest round is intact and is the last one planned (`run.rounds`);
- **resumable**: its newest round is intact and more are planned (`fedsim run CONFIG --resume`);
- **damaged**: its newest round fails its sha256 check, a round directory before it is missing,
  `latest` names a round that is not there, or a file cannot be read; the detail says what,
  and from which round `--resume` would continue (it falls back to the newest intact round);
- **empty**: no round was written yet (start it again with `--overwrite`).

Only the newest round's files are hashed (the one `--resume` starts from), so listing many runs
stays quick; older rounds are checked only when the newest is damaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedsim import checkpoint, rundir
from fedsim.config import clients_per_round, config_from_dict
from fedsim.errors import FedsimInputError
from fedsim.report import load_run

FINISHED, RESUMABLE, DAMAGED, EMPTY = "finished", "resumable", "damaged", "empty"
PREFERRED_EVAL_SET = "test"
"""The question set whose loss the table shows when a run was scored on several."""


@dataclass(frozen=True)
class RunRow:
    """One run directory, as `fedsim runs` shows it."""

    path: Path
    rounds_done: int
    """The newest intact round (the one `--resume` continues after)."""
    rounds_planned: int | None
    strategy: str | None
    clients: int | None
    per_round: int | None
    train_loss: float | None
    """Training loss of round `rounds_done` (metrics.jsonl)."""
    eval_loss: float | None
    eval_round: int | None
    """The newest evaluated round, whose held-out loss `eval_loss` is."""
    state: str
    problem: str | None = None
    """What is wrong with a damaged run."""

    @property
    def name(self) -> str:
        return self.path.name


def is_run_dir(path: Path) -> bool:
    """A folder fedsim made (its marker), or one with a config.yaml (written before the marker)."""
    return path.is_dir() and (rundir.is_fedsim_dir(path) or (path / "config.yaml").is_file())


def find_runs(output_dir: Path) -> list[Path]:
    """The run directories directly inside `output_dir`, by name; `output_dir` itself when it is
    one. Hidden folders (a run being replaced by --overwrite) are skipped."""
    if not output_dir.is_dir():
        raise FedsimInputError(f"{output_dir}: no such folder (fedsim runs OUTPUT_DIR)")
    if is_run_dir(output_dir):
        return [output_dir]
    return sorted(
        (p for p in output_dir.iterdir() if not p.name.startswith(".") and is_run_dir(p)),
        key=lambda p: p.name,
    )


def round_state(run_dir: Path, planned: int | None) -> tuple[str, int, str | None]:
    """(state, newest intact round, what is wrong) of `run_dir`'s rounds; see the module
    docstring for the states."""
    rounds = checkpoint.list_rounds(run_dir)
    if not rounds:
        return EMPTY, 0, None
    problem = _newest_round_problem(run_dir, rounds)
    if problem is None:
        done = rounds[-1]
        return (FINISHED if planned is not None and done >= planned else RESUMABLE), done, None
    intact = next((r for r in reversed(rounds) if _verify(run_dir, r) is None), 0)
    resume = f"--resume continues after round {intact}" if intact else "no intact round"
    return DAMAGED, intact, f"{problem}; {resume}"


def _verify(run_dir: Path, round_idx: int) -> str | None:
    return checkpoint.verify_round(
        run_dir / checkpoint.ROUNDS_DIR / checkpoint.round_name(round_idx)
    )


def _newest_round_problem(run_dir: Path, rounds: list[int]) -> str | None:
    """What is wrong with the newest round, the rounds before it, or `latest`; None if nothing."""
    problem = _verify(run_dir, rounds[-1])
    if problem:
        return problem
    missing = sorted(set(range(1, rounds[-1])) - set(rounds))
    if missing:
        return f"{checkpoint.ROUNDS_DIR}/{checkpoint.round_name(missing[0])} is missing"
    latest = run_dir / checkpoint.LATEST_FILE
    try:
        named = latest.read_text().strip()
    except OSError:
        return f"{latest} is missing"
    if not (run_dir / checkpoint.ROUNDS_DIR / named).is_dir():
        return f"{latest} names {named!r}, which is not in {checkpoint.ROUNDS_DIR}/"
    return None


def _setup(config: dict[str, Any]) -> tuple[int | None, str | None, int | None, int | None]:
    """(rounds planned, strategy, clients, clients per round) from a run's config.yaml; fields
    that an older fedsim wrote differently are None rather than an error."""
    run, server, data = (config.get(k) or {} for k in ("run", "server", "data"))
    try:
        per_round: int | None = clients_per_round(config_from_dict(config))
    except (FedsimInputError, TypeError, ValueError, AttributeError):
        per_round = server.get("clients_per_round")
    strategy = server.get("strategy", "fedavg")
    if server.get("mode") == "async":  # clients in flight, not a round's
        strategy, per_round = f"{strategy} (async)", server.get("concurrency")
    return run.get("rounds"), strategy, data.get("num_clients"), per_round


def _eval_loss(evals: dict[str, dict[int, dict[str, Any]]]) -> tuple[float | None, int | None]:
    """The held-out loss of the newest evaluated round, on the `test` set if it was scored."""
    if not evals:
        return None, None
    name = PREFERRED_EVAL_SET if PREFERRED_EVAL_SET in evals else sorted(evals)[0]
    newest = max(evals[name])
    return evals[name][newest].get("loss"), newest


def read_run(run_dir: Path) -> RunRow:
    """The table row of `run_dir`; an unreadable file makes the run damaged, never an error."""
    try:
        data = load_run(run_dir)
    except (FedsimInputError, OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        _, done, _ = round_state(run_dir, None)
        problem = str(err) if not isinstance(err, yaml.YAMLError) else "config.yaml is not YAML"
        return RunRow(run_dir, done, None, None, None, None, None, None, None, DAMAGED, problem)
    config = data.config if isinstance(data.config, dict) else {}
    planned, strategy, clients, per_round = _setup(config)
    state, done, problem = round_state(run_dir, planned)
    by_round = {int(r["round"]): r for r in data.train}
    train = by_round.get(done, {}).get("train_loss")
    eval_loss, eval_round = _eval_loss(data.evals)
    return RunRow(
        run_dir, done, planned, strategy, clients, per_round,
        train, eval_loss, eval_round, state, problem,
    )  # fmt: skip


COLUMNS = ("run", "rounds", "strategy", "clients", "train loss", "eval loss", "state")


def _cells(row: RunRow) -> tuple[str, ...]:
    def number(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    planned = "?" if row.rounds_planned is None else str(row.rounds_planned)
    clients = "?" if row.clients is None else str(row.clients)
    if row.per_round is not None:
        clients = f"{row.per_round} of {clients}"
    evaluated = number(row.eval_loss)
    if row.eval_loss is not None:
        evaluated += f" (round {row.eval_round})"
    return (
        row.name,
        f"{row.rounds_done}/{planned}",
        row.strategy or "?",
        clients,
        number(row.train_loss),
        evaluated,
        row.state,
    )


def format_runs_table(rows: list[RunRow]) -> str:
    """The table `fedsim runs` prints: a header, one line per run, then one line per damaged
    run saying what is wrong."""
    table = [COLUMNS, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in table]  # fmt: skip
    lines += [f"{r.name}: {r.problem}" for r in rows if r.problem]
    return "\n".join(lines)
