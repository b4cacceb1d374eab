"""Question sets: the shipped Vicuna and MT-bench files, user jsonl in both forms, errors."""

import json
from pathlib import Path

import pytest

from fedsim.errors import FedsimInputError
from fedsim.eval.questions import (
    Question,
    attach_references,
    read_jsonl_questions,
    set_name,
    subsample,
)


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_fastchat_and_instruction_forms(tmp_path):
    path = write(
        tmp_path / "mine.jsonl",
        [
            {
                "question_id": 7,
                "category": "math",
                "turns": ["2+2?", "and 3+3?"],
                "reference": ["4", "6"],
            },
            {"instruction": "Upper-case this.", "context": "cat", "response": "CAT", "exact": True},
            {"id": "x", "instruction": "Say hi."},
        ],
    )
    a, b, c = read_jsonl_questions(path)
    assert a == Question("7", "math", ("2+2?", "and 3+3?"), "", ("4", "6"), False)
    assert b == Question("2", "", ("Upper-case this.",), "cat", ("CAT",), True)
    assert (c.qid, c.references, c.reference(0)) == ("x", (), None)
    assert set_name(str(path)) == "mine" and set_name("vicuna") == "vicuna"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "mine.jsonl:2: not valid JSON"),
        ("[1, 2]", "mine.jsonl:2: expected a JSON object"),
        ('{"question": "x"}', "mine.jsonl:2: expected `turns`"),
        ('{"turns": []}', "mine.jsonl:2: turns: expected non-empty strings"),
        ('{"turns": ["ok"], "reference": 5}', "mine.jsonl:2: reference: expected a string"),
        ('{"turns": ["ok"], "exact": "yes"}', "mine.jsonl:2: exact: expected true or false"),
        ('{"question_id": 1, "turns": ["again"]}', "mine.jsonl:2: question_id 1 appears twice"),
    ],
)
def test_bad_line_is_named_by_file_and_line(tmp_path, line, expected):
    path = write(tmp_path / "mine.jsonl", [{"question_id": 1, "turns": ["ok"]}, line])
    with pytest.raises(FedsimInputError, match=expected):
        read_jsonl_questions(path)


def test_subsample_round_robin_over_categories():
    qs = tuple(Question(f"a{i}", "a", ("?",)) for i in range(4))
    qs += tuple(Question(f"b{i}", "b", ("?",)) for i in range(2))
    assert [q.qid for q in subsample(qs, 5)] == ["a0", "b0", "a1", "b1", "a2"]
    assert len(subsample(qs, 100)) == 6


def test_shipped_vicuna_and_mtbench(data_dir):
    folder = data_dir / "eval"
    if not (folder / "mtbench_questions.jsonl").is_file():
        pytest.skip(f"{folder} not present")
    vicuna = read_jsonl_questions(folder / "vicuna_questions.jsonl")
    assert len(vicuna) == 80 and all(len(q.turns) == 1 for q in vicuna)
    mtbench = attach_references(
        read_jsonl_questions(folder / "mtbench_questions.jsonl"),
        folder / "mtbench_reference_gpt4.jsonl",
    )
    assert len(mtbench) == 80 and all(len(q.turns) == 2 for q in mtbench)
    with_ref = {q.category for q in mtbench if q.references}
    assert with_ref == {"math", "reasoning", "coding"}
    assert all(len(q.references) == 2 for q in mtbench if q.references)
