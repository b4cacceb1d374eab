"""Built-in instruction data: deterministic, balanced, correct answers, short responses; the
pretraining text states the skills but holds no instruction or template."""

import json
import re
from collections import Counter
from pathlib import Path

from fedsim.data.sources import FieldMap, load_records
from fedsim.data.synthetic import (
    CATEGORIES,
    INSTRUCTIONS,
    OPPOSITES,
    STATEMENTS,
    VOCABULARY,
    generate_instructions,
    generic_text,
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
    assert uses_context["first_letter"] and uses_context["count_words"]
    assert not uses_context["add"] and not uses_context["parity"]
    assert not uses_context["next_number"] and not uses_context["opposite"]


def test_answers_are_correct() -> None:
    opposite = dict(OPPOSITES) | {b: a for a, b in OPPOSITES}
    for r in generate_instructions(400, seed=2):
        context, response = r["context"], r["response"]
        numbers = [int(w) for w in re.findall(r"\d+", r["instruction"])]
        match r["category"]:
            case "uppercase":
                assert response == context.upper() and len(context.split()) == 1
            case "first_letter":
                assert response == context[0] and len(context.split()) == 1
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


def test_generic_text_is_deterministic_and_free_of_templates_and_instructions() -> None:
    lines = generic_text(300, seed=0)

    assert lines == generic_text(300, seed=0)
    assert lines != generic_text(300, seed=1)
    text = "\n".join(lines)
    for template in TEMPLATES.values():
        assert template.render("x", "").split("x")[0].strip() not in text
    for marker in ("###", "Instruction", "Response", "Question", "Answer", "?"):
        assert marker not in text
    for instruction in INSTRUCTIONS.values():  # no instruction's fixed wording either
        assert instruction.split("{")[0].rstrip(".?") not in text


def test_generic_text_states_every_skill_correctly() -> None:
    text = " ".join(generic_text(400, seed=0))
    opposite = dict(OPPOSITES) | {b: a for a, b in OPPOSITES}

    capitals = re.findall(r"(\w+) in capitals is (\w+)\.", text)
    sums = re.findall(r"(\d) and (\d) make (\d+)\.", text)
    successors = re.findall(r"after (\d+) comes (\d+)\.", text)
    antonyms = re.findall(r"the opposite of (\w+) is (\w+)\.", text)

    assert capitals and all(b == a.upper() for a, b in capitals)
    assert sums and all(int(a) + int(b) == int(c) for a, b, c in sums)
    assert successors and all(int(a) + 1 == int(b) for a, b in successors)
    assert antonyms and all(opposite[a] == b for a, b in antonyms)
    parities = re.findall(r"(?<![\d ] )\b(\d+) is (even|odd)\.", text)
    assert parities and all(("odd", "even")[int(n) % 2 == 0] == p for n, p in parities)
    orders = re.findall(r"(\d) (\d) (\d) in order is (\d) (\d) (\d)\.", text)
    assert orders and all(sorted(o[:3]) == list(o[3:]) for o in orders)


def test_generic_text_uses_the_task_vocabulary() -> None:
    function_words = {"the", "a", "my", "we", "and", "are", "is", "can", "sees"}
    statement_words = {w for s in STATEMENTS.values() for w in s.split() if "{" not in w}
    known = (
        set(VOCABULARY)
        | {w + "s" for w in VOCABULARY}
        | {w.upper() for w in VOCABULARY}
        | function_words
        | {w.strip(".") for w in statement_words}
        | {"even", "odd"}
        | set("abcdefghijklmnopqrstuvwxyz")
    )

    words = {w.strip(".") for line in generic_text(300, seed=0) for w in line.split()}

    assert {w for w in words if not w.isdigit() and w.lower() not in known} == set()


def test_write_jsonl_loads_back(tmp_path: Path) -> None:
    records = generate_instructions(20, seed=0)
    path = tmp_path / "sub" / "quick.jsonl"

    write_jsonl(records, path)

    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert load_records(str(path), FieldMap()).num_rows == 20
