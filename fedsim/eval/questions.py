"""Question sets for evaluation: the run's held-out test split, Vicuna-80, MT-bench, or a jsonl.

Every set becomes a tuple of `Question`s: one or more user turns, optional reference answers
(one per turn) and whether the reference is the only right answer (exact match applies). A user's
jsonl may use FastChat's form (`question_id`, `category`, `turns`, `reference`) or the instruction
form of the training data (`instruction`, `context`, `response`, `category`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import ExperimentConfig, resolve_path
from fedsim.data.partitioners import positions_for
from fedsim.data.pipeline import BUILTIN_PREFIX, load_table
from fedsim.errors import FedsimInputError

BUILTIN_SETS = {"vicuna": "vicuna_questions.jsonl", "mtbench": "mtbench_questions.jsonl"}
MTBENCH_REFERENCES = "mtbench_reference_gpt4.jsonl"
TEST_SET = "test"


@dataclass(frozen=True)
class Question:
    """One question: its user turns and, where known, a reference answer per turn."""

    qid: str
    category: str
    turns: tuple[str, ...]
    context: str = ""
    """Optional input of the first turn (the `context` of an instruction record)."""
    references: tuple[str, ...] = ()
    """Reference answers, one per turn from the first; may be shorter than `turns` or empty."""
    exact: bool = False
    """The reference is the one right answer, so exact match is meaningful."""

    def reference(self, turn: int) -> str | None:
        return self.references[turn] if turn < len(self.references) else None


@dataclass(frozen=True)
class QuestionSet:
    """A named list of questions and where they came from."""

    name: str
    source: str
    questions: tuple[Question, ...]

    def fingerprint(self) -> str:
        payload = json.dumps([asdict(q) for q in self.questions], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def set_name(spec: str) -> str:
    """The file-name-safe name of a question set spec (`test`, `vicuna`, or a path's stem)."""
    if spec == TEST_SET or spec in BUILTIN_SETS:
        return spec
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec).stem) or "questions"


def load_question_sets(run_dir: Path, cfg: ExperimentConfig) -> list[QuestionSet]:
    """Every set named in `eval.question_sets`, each cut to `eval.max_questions`."""
    sets, names = [], {}
    for spec in cfg.eval.question_sets:
        name = set_name(spec)
        if name in names:
            raise FedsimInputError(
                f"eval.question_sets: {spec!r} and {names[name]!r} would both be called {name!r}"
            )
        names[name] = spec
        qset = _load_one(spec, name, run_dir, cfg)
        if cfg.eval.max_questions is not None:
            qset = QuestionSet(
                qset.name, qset.source, subsample(qset.questions, cfg.eval.max_questions)
            )
        sets.append(qset)
    return sets


def _load_one(spec: str, name: str, run_dir: Path, cfg: ExperimentConfig) -> QuestionSet:
    if spec == TEST_SET:
        return QuestionSet(name, f"{run_dir}/partition.json:test", test_split(run_dir, cfg))
    if spec in BUILTIN_SETS:
        folder = Path(resolve_path(cfg.eval.questions_dir, "eval.questions_dir"))
        path = folder / BUILTIN_SETS[spec]
        if not path.is_file():
            raise FedsimInputError(
                f"eval.questions_dir: {path} not found (set FEDSIM_DATA_DIR or "
                f"eval.questions_dir to the folder holding {BUILTIN_SETS[spec]})"
            )
        questions = read_jsonl_questions(path)
        if spec == "mtbench":
            questions = attach_references(questions, folder / MTBENCH_REFERENCES)
        return QuestionSet(name, str(path), tuple(questions))
    path = Path(resolve_path(spec, "eval.question_sets"))
    if not path.is_file():
        raise FedsimInputError(
            f"eval.question_sets: {spec!r} is neither test, vicuna, mtbench nor an existing file"
        )
    return QuestionSet(name, str(path), tuple(read_jsonl_questions(path)))


def test_split(run_dir: Path, cfg: ExperimentConfig) -> tuple[Question, ...]:
    """The run's held-out test records (partition.json), read back from the run's data source."""
    partition_path = run_dir / "partition.json"
    try:
        partition = json.loads(partition_path.read_text())
        wanted = partition["test"]["source_index"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FedsimInputError(f"{partition_path}: missing or unreadable") from None
    if not wanted:
        raise FedsimInputError(
            f"eval.question_sets: 'test', but {run_dir} has no held-out test split "
            "(data.test_per_category is 0 and the split file has no test list)"
        )
    table, fingerprint = load_table(cfg.data)
    if fingerprint != partition.get("data_fingerprint"):
        raise FedsimInputError(
            f"data.source: {cfg.data.source} is not the data this run was trained on "
            f"(its fingerprint differs from {partition_path})"
        )
    positions = positions_for(
        table.column("source_index").to_numpy(), np.asarray(wanted), str(partition_path), "test"
    )
    return record_questions(table.take(positions).to_pylist(), "test", answers_are_exact(cfg))


def answers_are_exact(cfg: ExperimentConfig) -> bool:
    """Whether the run's reference answers have one right form (`eval.exact_match`; unset:
    generated tasks have exactly one right answer, human answers do not)."""
    if cfg.eval.exact_match is not None:
        return cfg.eval.exact_match
    return cfg.data.source.startswith(BUILTIN_PREFIX)


def record_questions(rows: list[dict[str, Any]], prefix: str, exact: bool) -> tuple[Question, ...]:
    """Held-out records (Arrow rows) as single-turn questions, ids `<prefix>-<source_index>`."""
    return tuple(
        Question(
            qid=f"{prefix}-{row['source_index']}",
            category=row["category"],
            turns=(row["instruction"],),
            context=row["context"],
            references=(row["response"],),
            exact=exact,
        )
        for row in rows
    )


def _strings(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def read_jsonl_questions(path: Path) -> list[Question]:
    """Questions from a jsonl file; any malformed line is an error naming FILE:LINE."""
    questions: list[Question] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FedsimInputError(f"{path}: cannot read question file ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError:
            raise FedsimInputError(f"{where}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise FedsimInputError(f"{where}: expected a JSON object")
        question = _question_from(obj, number, where)
        if question.qid in seen:
            raise FedsimInputError(f"{where}: question_id {question.qid} appears twice")
        seen.add(question.qid)
        questions.append(question)
    if not questions:
        raise FedsimInputError(f"{path}: no questions")
    return questions


def _question_from(obj: dict[str, Any], number: int, where: str) -> Question:
    if "turns" in obj:
        turns = _strings(obj["turns"])
        context = ""
    elif "instruction" in obj:
        turns = _strings(obj["instruction"])
        context = obj.get("context") or obj.get("input") or ""
        if not isinstance(context, str):
            raise FedsimInputError(f"{where}: context: expected a string")
    else:
        raise FedsimInputError(f"{where}: expected `turns` (a list of strings) or `instruction`")
    if not turns or not all(t.strip() for t in turns):
        raise FedsimInputError(f"{where}: turns: expected non-empty strings")
    ref_value = next(
        (obj[k] for k in ("reference", "response", "answer") if obj.get(k) is not None), None
    )
    references = _strings(ref_value) if ref_value is not None else []
    if references is None:
        raise FedsimInputError(f"{where}: reference: expected a string or a list of strings")
    exact = obj.get("exact", False)
    if not isinstance(exact, bool):
        raise FedsimInputError(f"{where}: exact: expected true or false")
    category = obj.get("category") or ""
    return Question(
        qid=str(obj.get("question_id", obj.get("id", number))),
        category=str(category),
        turns=tuple(turns),
        context=context,
        references=tuple(references),
        exact=exact,
    )


def attach_references(questions: list[Question], path: Path) -> list[Question]:
    """MT-bench: GPT-4's reference answers (math, reasoning, coding) by question id."""
    if not path.is_file():
        raise FedsimInputError(f"eval.questions_dir: {path} not found (MT-bench reference answers)")
    refs: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            refs[str(obj["question_id"])] = tuple(obj["choices"][0]["turns"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise FedsimInputError(
                f"{path}:{number}: expected question_id and choices[0].turns"
            ) from None
    return [
        Question(q.qid, q.category, q.turns, q.context, refs.get(q.qid, ()), q.exact)
        for q in questions
    ]


def subsample(questions: tuple[Question, ...], limit: int) -> tuple[Question, ...]:
    """At most `limit` questions, taken round-robin over categories (first-seen order), so that
    a small subset still covers every category."""
    by_category: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_category[q.category].append(q)
    queues = list(by_category.values())
    picked: list[Question] = []
    depth = 0
    while len(picked) < min(limit, len(questions)):
        for queue in queues:
            if depth < len(queue) and len(picked) < limit:
                picked.append(queue[depth])
        depth += 1
    return tuple(picked)
