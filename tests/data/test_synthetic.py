"""Built-in instruction data: deterministic, balanced, correct answers, short responses; the
pretraining text states the skills but holds no instruction or template."""

import json
import random
import re
from collections import Counter
from pathlib import Path

from fedsim.data.sources import FieldMap, load_records
from fedsim.data.synthetic import (
    CATEGORIES,
    INSTRUCTIONS,
    OPPOSITES,
    generate_instructions,
    generic_text,
    skill_statement,
    write_jsonl,
)
from fedsim.data.templates import TEMPLATES


def test_same_seed_same_records_other_seed_other_records() -> None:
    assert generate_instructions(50, seed=3) == generate_instructions(50, seed=3)
    assert generate_instructions(50, seed=3) != generate_instructions(50, seed=4)


def test_eight_balanced_categories() -> None:
    counts = Counter(r["category"] for r in generate_instructions(803, seed=0))

    assert set(counts) == set(CATEGORIES)
    assert len(CATEGORIES) == 8
    assert max(counts.values()) - min(counts.values()) <= 1


def test_responses_are_short_and_fields_are_strings() -> None:
    for record in generate_instructions(400, seed=1):
        assert set(record) == {"instruction", "context", "response", "category"}
        assert all(isinstance(v, str) for v in record.values())
        assert 1 <= len(record["response"].split()) <= 10


def test_some_categories_use_the_input_field_and_some_do_not() -> None:
    uses_context = {r["category"]: bool(r["context"]) for r in generate_instructions(80, seed=0)}

    assert uses_context["uppercase"] and uses_context["sort_numbers"]
    assert uses_context["count_words"]
    assert not uses_context["add"] and not uses_context["parity"]
    assert not uses_context["next_number"] and not uses_context["opposite"]
    assert not uses_context["subtract"]


def test_answers_are_correct() -> None:
    opposite = dict(OPPOSITES) | {b: a for a, b in OPPOSITES}
    for r in generate_instructions(400, seed=2):
        context, response = r["context"], r["response"]
        numbers = [int(w) for w in re.findall(r"\d+", r["instruction"])]
        match r["category"]:
            case "uppercase":
                assert response == context.upper() and len(context.split()) == 1
            case "subtract":
                assert response == str(numbers[0] - numbers[1]) and int(response) >= 0
            case "sort_numbers":
                assert response.split() == [str(n) for n in sorted(map(int, context.split()))]
            case "add":
                assert response == str(sum(numbers)) and len(numbers) == 2
            case "next_number":
                assert response == str(numbers[0] + 1)
            case "count_words":
                assert response == str(len(context.split()))
            case "opposite":
                assert response == opposite[r["instruction"].split()[-1].strip("?")]
            case "parity":
                assert response == ("even" if numbers[0] % 2 == 0 else "odd")
            case other:
                raise AssertionError(f"unexpected category {other}")


def test_opposites_table_is_a_bijection() -> None:
    words = [w for pair in OPPOSITES for w in pair]

    assert len(OPPOSITES) >= 40
    assert len(set(words)) == len(words)


def test_generic_text_is_deterministic_and_free_of_templates() -> None:
    lines = generic_text(300, seed=0)

    assert lines == generic_text(300, seed=0)
    assert lines != generic_text(300, seed=1)
    text = "\n".join(lines)
    for template in TEMPLATES.values():
        assert template.render("x", "").split("x")[0].strip() not in text
    for marker in ("###", "Instruction", "Response", "Question", "Answer", "Input"):
        assert marker not in text


def test_generic_text_holds_correct_task_instances_of_every_category() -> None:
    text = " | ".join(generic_text(400, seed=0))
    demos = [d for d in text.split(" | ") if " -> " in d]
    assert len(demos) > 600
    seen = set()
    for demo in demos:
        question, answer = demo.rsplit(" -> ", 1)
        (category,) = [c for c in CATEGORIES if _asks(c, question)]
        assert answer == _answer(category, question), demo
        seen.add(category)
    assert seen == set(CATEGORIES)


def test_a_task_instance_reads_as_its_instruction_record() -> None:
    rng = random.Random(3)
    for category in CATEGORIES:
        question, answer = skill_statement(category, rng).rsplit(" -> ", 1)
        assert _asks(category, question)
        assert answer == _answer(category, question)


def _asks(category: str, question: str) -> bool:
    """Whether `question` is `category`'s instruction (then its input, if it takes one)."""
    pattern = re.sub(r"\\\{\w+\\\}", r"\\S+", re.escape(INSTRUCTIONS[category]))
    return re.fullmatch(pattern + r"( .+)?", question) is not None


def _answer(category: str, question: str) -> str:
    """The correct answer, computed here from the question text alone."""
    numbers = [int(w) for w in re.findall(r"\d+", question)]
    words = question.split(". ", 1)[-1].split() if ". " in question else []
    return {
        "uppercase": lambda: words[-1].upper() if words else "",
        "subtract": lambda: str(numbers[0] - numbers[1]),
        "sort_numbers": lambda: " ".join(map(str, sorted(numbers))),
        "add": lambda: str(sum(numbers)),
        "next_number": lambda: str(numbers[0] + 1),
        "count_words": lambda: str(len(question.split("? ", 1)[1].split())),
        "opposite": lambda: dict(OPPOSITES + tuple((b, a) for a, b in OPPOSITES))[
            question.split()[-1].strip("?")
        ],
        "parity": lambda: ("even", "odd")[numbers[0] % 2],
    }[category]()


def test_write_jsonl_loads_back(tmp_path: Path) -> None:
    records = generate_instructions(20, seed=0)
    path = tmp_path / "sub" / "quick.jsonl"

    write_jsonl(records, path)

    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert load_records(str(path), FieldMap()).num_rows == 20
