"""The evaluation job: score a run's round checkpoints (`fedsim eval`).

It reads the run directory as the trainer leaves it and writes only `rounds/round_N/eval/`,
`eval.jsonl` (one line per scored (round, question set), appended) and tensorboard/eval/, so it
can run beside the trainer (`--watch`), as a separate process or its own `ray job submit`,
without ever blocking the round loop. It never writes metrics.jsonl: the trainer rewrites that
file when it resumes, and would drop lines another process appended meanwhile. The flow:

1. open — every input problem (run directory, question files, judge key and prompts, baseline,
   rounds) is found before any model is loaded;
2. per round — load the adapter into the base model loaded once; per question set: generate,
   compute the offline metrics, ask the judge; write the results;
3. watch — poll for new rounds until `latest` names the run's last round.

Results of a (round, question set) whose adapter and evaluation settings have not changed are
kept, not recomputed, unless `force` is given.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fedsim import checkpoint, rundir
from fedsim.config import (
    ConfigError,
    ExperimentConfig,
    apply_override,
    config_from_dict,
    resolve_path,
)
from fedsim.data.templates import PromptTemplate, get_template
from fedsim.errors import FedsimInputError
from fedsim.eval import judge as judging
from fedsim.eval.generation import Answer, AnswerModel
from fedsim.eval.metrics import exact_match, perplexity, rouge_l, summarize
from fedsim.eval.questions import Question, QuestionSet, load_question_sets
from fedsim.lora_ranks import BASE_DELTA_PREFIX
from fedsim.model import quiet_libraries
from fedsim.tracking import eval_tracker

Log = Callable[[str], None]
TensorDict = dict[str, Any]
EVAL_DIR = "eval"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.jsonl"
"""The run directory's log of evaluation results: one JSON line per scored (round, set)."""


def _print(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------
# Opening a run
# ------------------------------------------------------------------------------------------


@dataclass
class EvalRun:
    """A run directory and its resolved config (with any `eval.*` overrides applied)."""

    run_dir: Path
    cfg: ExperimentConfig

    @property
    def template(self) -> PromptTemplate:
        return get_template(self.cfg.data.template)

    def round_dir(self, round_idx: int) -> Path:
        return self.run_dir / checkpoint.ROUNDS_DIR / checkpoint.round_name(round_idx)


def open_run(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> EvalRun:
    """Read RUN_DIR/config.yaml and apply `--set eval.*` overrides; raises FedsimInputError."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FedsimInputError(f"{run_dir}: not a run directory (no config.yaml)")
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise FedsimInputError(f"{config_path}: unreadable ({err})") from None
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        if not key.startswith("eval."):
            raise FedsimInputError(
                f"--set {key}: evaluation takes eval.* overrides only (the rest of the config "
                "is what the run was trained with)"
            )
        apply_override(raw, assignment)
    try:
        cfg = config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError([f"{config_path}: {p}" for p in err.problems]) from None
    return EvalRun(run_dir, cfg)


def latest_round(run_dir: Path) -> int:
    """The round `latest` names, or 0 before the first round."""
    try:
        name = (run_dir / checkpoint.LATEST_FILE).read_text().strip()
    except OSError:
        return 0
    return int(name.removeprefix("round_")) if name.startswith("round_") else 0


def run_finished(run_dir: Path) -> bool:
    """Whether `latest` names the last round of the run's config.yaml (re-read each time: a
    resumed run may have been extended)."""
    try:
        rounds = int(yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["rounds"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return False
    return latest_round(run_dir) >= rounds


def load_adapter(run: EvalRun, round_idx: int) -> tuple[TensorDict, str]:
    """A verified round's adapter and its sha256; a missing or damaged round is an input error."""
    path = run.round_dir(round_idx)
    if not path.is_dir():
        have = checkpoint.list_rounds(run.run_dir)
        span = f"rounds {have[0]}..{have[-1]}" if have else "no rounds yet"
        raise FedsimInputError(f"{run.run_dir} has no round {round_idx} ({span})")
    problem = checkpoint.verify_round(path)
    if problem:
        raise FedsimInputError(f"{path}: damaged: {problem}")
    ckpt = checkpoint.load_round(path)
    # FLoRA's rounds also move the base weights: their merged delta travels with the adapter
    merged = {k: v for k, v in ckpt.server_state.items() if k.startswith(BASE_DELTA_PREFIX)}
    return {**ckpt.adapter, **merged}, ckpt.info["files"][checkpoint.ADAPTER_FILE]


# ------------------------------------------------------------------------------------------
# Models: one base model per (path, dtype, LoRA), adapters swapped in
# ------------------------------------------------------------------------------------------


class ModelPool:
    """Base models loaded once each; the run and a baseline from a run of the same base share
    one."""

    def __init__(self) -> None:
        self._models: dict[str, AnswerModel] = {}

    def get(self, cfg: ExperimentConfig) -> AnswerModel:
        from fedsim.prepare import prepare_model

        path = prepare_model(cfg, log=lambda _: None)
        lora = cfg.model.lora
        key = json.dumps([path, cfg.model.dtype, asdict(lora)], sort_keys=True)
        if key not in self._models:
            self._models[key] = AnswerModel(path, cfg.model.dtype, lora)
        return self._models[key]


@dataclass
class Baseline:
    """What the pairwise judge compares against."""

    label: str
    run: EvalRun
    adapter: TensorDict | None
    adapter_sha256: str | None
    answers: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    """Answers per question-set fingerprint, generated once per job."""


def resolve_baseline(spec: str, run: EvalRun) -> Baseline:
    """`base`, `round:N` of this run, or another run directory `PATH[@N]` (latest round)."""
    if spec == "base":
        return Baseline("base model", run, None, None)
    if spec.startswith("round:"):
        round_idx = int(spec.removeprefix("round:"))
        try:
            adapter, sha = load_adapter(run, round_idx)
        except FedsimInputError as err:
            raise FedsimInputError(f"eval.judge.baseline: {err}") from None
        return Baseline(checkpoint.round_name(round_idx), run, adapter, sha)
    path, _, at = spec.partition("@")
    try:
        other = open_run(path)
    except FedsimInputError as err:
        raise FedsimInputError(f"eval.judge.baseline: {err}") from None
    if at:
        if not at.removeprefix("round:").isdigit():
            raise FedsimInputError(f"eval.judge.baseline: expected PATH@N, got {spec!r}")
        round_idx = int(at.removeprefix("round:"))
    else:
        round_idx = latest_round(other.run_dir)
        if round_idx == 0:
            raise FedsimInputError(f"eval.judge.baseline: {path} has no complete round yet")
    try:
        adapter, sha = load_adapter(other, round_idx)
    except FedsimInputError as err:
        raise FedsimInputError(f"eval.judge.baseline: {err}") from None
    return Baseline(f"{path}@{round_idx}", other, adapter, sha)


# ------------------------------------------------------------------------------------------
# Writing results: eval/ files atomically, eval.jsonl by single O_APPEND writes (fedsim.rundir)
# ------------------------------------------------------------------------------------------


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def append_eval_line(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one result line to RUN_DIR/eval.jsonl (one O_APPEND write, fsynced): concurrent
    evaluation jobs never interleave, and no trainer ever rewrites the file."""
    rundir.append_jsonl(run_dir / EVAL_FILE, record)


@contextlib.contextmanager
def _locked(eval_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of summary.json between evaluation jobs on one round."""
    with open(eval_dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_summary(round_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((round_dir / EVAL_DIR / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------
# The evaluator
# ------------------------------------------------------------------------------------------


@dataclass
class SetResult:
    """One question set scored at one round."""

    round_idx: int
    name: str
    summary: dict[str, Any]
    skipped: bool = False


class Evaluator:
    """Scores rounds of one run. Construction checks every input; nothing is loaded before."""

    def __init__(self, run: EvalRun, *, force: bool = False, log: Log = _print) -> None:
        self.run = run
        self.cfg = run.cfg
        self.force = force
        self.log = log
        e = self.cfg.eval
        # --- inputs first: any problem is an error before a model is loaded ---
        self.sets: list[QuestionSet] = load_question_sets(run.run_dir, self.cfg)
        self.template = run.template
        self.judge: judging.Judge | None = None
        self.prompts: dict[str, judging.JudgePrompt] = {}
        self.baseline: Baseline | None = None
        self.prices = judging.prices_for(e.judge)
        if e.judge.single or e.judge.baseline:
            self.prompts_path = Path(resolve_path(e.judge.prompts, "eval.judge.prompts"))
            self.prompts = judging.load_judge_prompts(self.prompts_path)
            key = judging.api_key(e.judge)
            if e.judge.baseline:
                self.baseline = resolve_baseline(e.judge.baseline, run)
            cache_dir = (
                Path(resolve_path(e.judge.cache_dir, "eval.judge.cache_dir"))
                if e.judge.cache_dir
                else None
            )
            self.judge = judging.Judge(
                e.judge, judging.JudgeCache(cache_dir or judging.default_cache_dir()), key
            )
        self.judge_errors: list[str] = []
        quiet_libraries()
        torch.set_num_threads(e.num_threads)
        self.models = ModelPool()
        self.scalars = eval_tracker(run.run_dir, self.cfg)

    def close(self) -> None:
        self.scalars.close()
        if self.judge is not None:
            self.judge.close()

    # -- settings fingerprint: results with the same one are up to date --

    def settings_hash(self, qset: QuestionSet) -> str:
        e = self.cfg.eval
        payload: dict[str, Any] = {
            "questions": qset.fingerprint(),
            "generation": asdict(e.generation),
            "template": self.cfg.data.template,
            "cutoff_len": self.cfg.data.cutoff_len,
        }
        if self.judge is not None:
            payload["judge"] = {
                "endpoint": self.judge.endpoint,  # another server is another judge
                "model": e.judge.model,
                "single": e.judge.single,
                "max_tokens": e.judge.max_tokens,
                "prompts": hashlib.sha256(self.prompts_path.read_bytes()).hexdigest(),
            }
            if self.baseline is not None:
                payload["judge"]["baseline"] = [self.baseline.label, self.baseline.adapter_sha256]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    # -- one round --

    def evaluate_round(self, round_idx: int) -> list[SetResult]:
        """Score every question set at `round_idx`; write eval/ and eval.jsonl lines."""
        adapter, adapter_sha = load_adapter(self.run, round_idx)
        round_dir = self.run.round_dir(round_idx)
        eval_dir = rundir.make_dir(round_dir / EVAL_DIR)
        previous = read_summary(round_dir)
        results: list[SetResult] = []
        for qset in self.sets:
            settings = self.settings_hash(qset)
            old = previous.get("sets", {}).get(qset.name)
            if (
                not self.force
                and old
                and old.get("settings_hash") == settings
                and previous.get("adapter_sha256") == adapter_sha
                and not old.get("judge_errors")
            ):
                results.append(SetResult(round_idx, qset.name, old, skipped=True))
                continue
            # (again for every set: a baseline sharing the base model swaps its own adapter in)
            model = self.models.get(self.cfg)
            model.use_adapter(adapter)
            summary = self._evaluate_set(qset, model, eval_dir)
            summary["settings_hash"] = settings
            with _locked(eval_dir):
                current = read_summary(round_dir)
                if current.get("adapter_sha256") != adapter_sha:
                    current = {}  # results of an older adapter of a redone round
                current["round"] = round_idx
                current["adapter_sha256"] = adapter_sha
                current.setdefault("sets", {})[qset.name] = summary
                rundir.write_text_atomic(eval_dir / SUMMARY_FILE, json.dumps(current, indent=1))
            line = {"kind": "eval", "round": round_idx, "set": qset.name, **flat_metrics(summary)}
            # the adapter's hash lets a report tell a result of a round later redone (a resumed
            # run) from one of the round as it is now
            append_eval_line(self.run.run_dir, {**line, "adapter_sha256": adapter_sha})
            self.scalars.add_all(f"eval/{qset.name}", line, round_idx)
            self.scalars.flush()
            results.append(SetResult(round_idx, qset.name, summary))
        return results

    def _evaluate_set(
        self, qset: QuestionSet, model: AnswerModel, eval_dir: Path
    ) -> dict[str, Any]:
        start = time.perf_counter()
        e = self.cfg.eval
        questions = qset.questions
        answers = model.answer(questions, self.template, e.generation)
        by_qid = {a.qid: a.answers for a in answers}

        # offline metrics
        rows = _answer_rows(questions, answers)
        turn_rows = [
            {"category": q.category, "rouge_l": r}
            for q, row in zip(questions, rows, strict=True)
            for r in row["rouge_l"]
            if r is not None
        ]
        em_rows = [
            {"category": q.category, "exact_match": float(row["exact_match"])}
            for q, row in zip(questions, rows, strict=True)
            if row["exact_match"] is not None
        ]
        with_reference = [q for q in questions if len(q.turns) == 1 and q.references]
        losses = model.response_loss(
            with_reference, self.template, self.cfg.data.cutoff_len, e.generation.batch_size
        )
        loss_of = {x.qid: x for x in losses}
        for q, row in zip(questions, rows, strict=True):
            x = loss_of.get(q.qid)
            row["loss"] = x.loss_sum / x.tokens if x and x.tokens else None
        summary: dict[str, Any] = {
            "set": qset.name,
            "source": qset.source,
            "questions": len(questions),
            "generation": asdict(e.generation),
            "truncated_prompts": sum(a.truncated_prompt for a in answers),
            **_loss_summary(questions, loss_of),
            "rouge_l": summarize(turn_rows, "rouge_l"),
            "exact_match": summarize(em_rows, "exact_match"),
        }
        rundir.write_text_atomic(eval_dir / f"answers_{qset.name}.jsonl", _jsonl(rows))

        # the judge
        if self.judge is not None:
            summary["judge"] = self._judge_set(qset, by_qid, eval_dir)
            errors = summary["judge"]["usage"]["errors"]
            if errors:
                summary["judge_errors"] = errors
        summary["seconds"] = round(time.perf_counter() - start, 3)
        return summary

    def _baseline_answers(self, qset: QuestionSet) -> dict[str, tuple[str, ...]]:
        baseline = self.baseline
        assert baseline is not None
        key = qset.fingerprint()
        if key not in baseline.answers:
            model = self.models.get(baseline.run.cfg)
            model.use_adapter(baseline.adapter)
            answers = model.answer(qset.questions, baseline.run.template, self.cfg.eval.generation)
            baseline.answers[key] = {a.qid: a.answers for a in answers}
        return baseline.answers[key]

    def _judge_set(
        self, qset: QuestionSet, answers: dict[str, tuple[str, ...]], eval_dir: Path
    ) -> dict[str, Any]:
        assert self.judge is not None
        e = self.cfg.eval.judge
        rows: list[dict[str, Any]] = []
        replies: list[judging.JudgeReply] = []
        # the endpoint as redact_url leaves it: credentials in the URL are never recorded
        result: dict[str, Any] = {"model": e.model, "base_url": self.judge.endpoint}
        if e.single:
            single_rows, single_replies = judging.grade_single(
                self.judge, self.prompts, qset.questions, answers
            )
            rows += single_rows
            replies += single_replies
            result["single"] = judging.summarize_single(single_rows)
        if self.baseline is not None:
            theirs = self._baseline_answers(qset)
            pair_rows, pair_replies = judging.compare_pairwise(
                self.judge, self.prompts, qset.questions, answers, theirs
            )
            rows += pair_rows
            replies += pair_replies
            result["pairwise"] = {
                "baseline": self.baseline.label,
                **judging.summarize_pairwise(pair_rows),
            }
            rundir.write_text_atomic(
                eval_dir / f"baseline_answers_{qset.name}.jsonl",
                _jsonl([{"qid": q, "answers": list(a)} for q, a in theirs.items()]),
            )
        usage = judging.account(replies, self.prices)
        result["usage"] = usage.as_dict()
        for error in usage.errors_seen:
            if error not in self.judge_errors:
                self.judge_errors.append(error)
        rundir.write_text_atomic(eval_dir / f"judgments_{qset.name}.jsonl", _jsonl(rows))
        return result


def _answer_rows(questions: Any, answers: list[Answer]) -> list[dict[str, Any]]:
    rows = []
    for q, a in zip(questions, answers, strict=True):
        rouge = [
            rouge_l(text, q.reference(t)) if q.reference(t) is not None else None
            for t, text in enumerate(a.answers)
        ]
        em = exact_match(a.answers[0], q.references[0]) if q.exact and q.references else None
        rows.append(
            {
                "qid": q.qid,
                "category": q.category,
                "turns": list(q.turns),
                "context": q.context,
                "answers": list(a.answers),
                "references": list(q.references),
                "rouge_l": rouge,
                "exact_match": em,
                "new_tokens": a.new_tokens,
                "truncated_prompt": a.truncated_prompt,
            }
        )
    return rows


def _loss_summary(questions: Any, loss_of: dict[str, Any]) -> dict[str, Any]:
    """Token-weighted mean loss of the reference answers (and its exp), overall and per
    category."""
    totals: dict[str, list[float]] = {}
    for q in questions:
        x = loss_of.get(q.qid)
        if x is None or not x.tokens:
            continue
        t = totals.setdefault(q.category, [0.0, 0])
        t[0] += x.loss_sum
        t[1] += x.tokens
    loss_sum = sum(t[0] for t in totals.values())
    tokens = sum(int(t[1]) for t in totals.values())
    loss = loss_sum / tokens if tokens else None
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "loss_tokens": tokens,
        "loss_by_category": {
            c: {"loss": s / n, "perplexity": perplexity(s / n), "tokens": int(n)}
            for c, (s, n) in sorted(totals.items())
        },
    }


def flat_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one set's summary, as one flat eval.jsonl record."""
    out: dict[str, Any] = {
        "questions": summary["questions"],
        "loss": summary.get("loss"),
        "perplexity": summary.get("perplexity"),
        "rouge_l": summary["rouge_l"]["mean"],
        "exact_match": summary["exact_match"]["mean"],
    }
    judge = summary.get("judge")
    if judge:
        if "single" in judge:
            s = judge["single"]
            out |= {"judge_score": s["mean"], "judge_n": s["n"], "judge_excluded": s["excluded"]}
        if "pairwise" in judge:
            p = judge["pairwise"]
            out |= {
                "baseline": p["baseline"],
                "win_rate": p["win_rate"],
                "wins": p["wins"],
                "losses": p["losses"],
                "ties": p["ties"],
                "pair_excluded": p["excluded"],
            }
        u = judge["usage"]
        out |= {
            "judge_requests": u["requests"],
            "judge_cached": u["cached"],
            "judge_prompt_tokens": u["prompt_tokens"],
            "judge_completion_tokens": u["completion_tokens"],
            "judge_cost_usd": u["cost_usd"],
        }
    out["seconds"] = summary.get("seconds")
    return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------
# Which rounds: a list, all of them, or watch for new ones
# ------------------------------------------------------------------------------------------


def parse_rounds(text: str) -> list[int]:
    """`3,5` or `2-4` or a mix, as sorted distinct round numbers."""
    rounds: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise FedsimInputError(f"--rounds: expected numbers like 3,5 or 2-4, got {text!r}")
        rounds.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    if 0 in rounds:
        raise FedsimInputError("--rounds: rounds are numbered from 1")
    return sorted(rounds)


def evaluate_rounds(evaluator: Evaluator, rounds: list[int]) -> list[SetResult]:
    """Score the given rounds, which are all checked before the first is scored."""
    for r in rounds:
        load_adapter(evaluator.run, r)
    results = []
    for r in rounds:
        results += _evaluate_logged(evaluator, r)
    return results


def _evaluate_logged(evaluator: Evaluator, round_idx: int) -> list[SetResult]:
    results = evaluator.evaluate_round(round_idx)
    for result in results:
        evaluator.log(format_result(result))
    return results


def watch(
    evaluator: Evaluator,
    *,
    timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[SetResult]:
    """Score every round as the trainer writes it; return once the run is finished (`latest`
    names round `run.rounds` of its config.yaml) and every round is scored."""
    run_dir = evaluator.run.run_dir
    poll = evaluator.cfg.eval.poll_seconds
    deadline = time.monotonic() + timeout if timeout else None
    seen: set[tuple[int, str]] = set()
    results: list[SetResult] = []
    waiting_logged = False
    while True:
        finished = run_finished(run_dir)  # read before listing: no round can be missed
        for r in checkpoint.list_rounds(run_dir):
            path = evaluator.run.round_dir(r)
            try:
                sha = json.loads((path / checkpoint.ROUND_INFO_FILE).read_text())["files"][
                    checkpoint.ADAPTER_FILE
                ]
            except (OSError, ValueError, KeyError):
                sha = ""
            if (r, sha) in seen:
                continue
            seen.add((r, sha))
            problem = checkpoint.verify_round(path)
            if problem:
                evaluator.log(f"watch: skipping {path.name}: {problem}")
                continue
            results += _evaluate_logged(evaluator, r)
            waiting_logged = False
        if finished:
            return results
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"watch: {run_dir} did not finish within {timeout:g} s "
                f"(latest round {latest_round(run_dir)})"
            )
        if not waiting_logged:
            evaluator.log(f"watch: waiting for round {latest_round(run_dir) + 1} of {run_dir}")
            waiting_logged = True
        sleep(poll)


def wait_for_first_round(
    run_dir: Path,
    poll: float,
    timeout: float | None,
    log: Log = _print,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Wait until the trainer has finished its first round (`latest` exists), so that a watcher
    can be started together with the trainer, before the run directory is even created."""
    deadline = time.monotonic() + timeout if timeout else None
    if not (run_dir / checkpoint.LATEST_FILE).exists():
        log(f"watch: waiting for the first round of {run_dir}")
    while not (run_dir / checkpoint.LATEST_FILE).exists():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"watch: {run_dir} has no round after {timeout:g} s")
        sleep(poll)


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def format_result(result: SetResult) -> str:
    """One line per (round, question set), as `fedsim eval` prints it."""
    s = result.summary
    parts = [f"round {result.round_idx:>3} {result.name}: {s['questions']} questions"]
    if s.get("loss") is not None:
        parts.append(f"loss {s['loss']:.4f} (ppl {s['perplexity']:.2f})")
    if s["rouge_l"]["n"]:
        parts.append(f"rouge-L {s['rouge_l']['mean']:.3f}")
    if s["exact_match"]["n"]:
        parts.append(f"exact {s['exact_match']['mean']:.3f}")
    judge = s.get("judge") or {}
    if "single" in judge:
        j = judge["single"]
        parts.append(f"judge {_num(j['mean'], '.2f')}/10 (n {j['n']}, {j['excluded']} excluded)")
    if "pairwise" in judge:
        p = judge["pairwise"]
        parts.append(
            f"vs {p['baseline']}: win rate {_num(p['win_rate'], '.3f')} "
            f"({p['wins']}W {p['losses']}L {p['ties']}T, {p['excluded']} excluded)"
        )
    if judge:
        u = judge["usage"]
        cost = f", ~${u['cost_usd']:.4f}" if u["cost_usd"] is not None else ""
        parts.append(
            f"{u['requests']} requests, {u['cached']} cached, "
            f"{u['prompt_tokens'] + u['completion_tokens']} tokens{cost}"
        )
    if len(parts) == 1:
        parts.append("answers only (no references; the judge can score them)")
    if result.skipped:
        parts.append("up to date (--force redoes it)")
    return " | ".join(parts)


def answer_prompts(run: EvalRun, round_idx: int | None, prompts: Iterable[str]) -> Iterator[str]:
    """Answer each prompt (an instruction) with round `round_idx`'s adapter (None: the latest;
    0: the base model alone), using `eval.generation` settings."""
    if round_idx is None:
        round_idx = latest_round(run.run_dir)
        if round_idx == 0:
            raise FedsimInputError(f"{run.run_dir} has no complete round (--round 0: base model)")
    adapter = load_adapter(run, round_idx)[0] if round_idx else None
    quiet_libraries()
    model = ModelPool().get(run.cfg)
    model.use_adapter(adapter)
    for prompt in prompts:
        question = Question("prompt", "", (prompt.strip(),))
        (answer,) = model.answer([question], run.template, run.cfg.eval.generation)
        yield answer.answers[0]
