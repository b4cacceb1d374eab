"""Built-in instruction data: deterministic, balanced, correct answers, short responses."""

import json
from collections import Counter
from pathlib import Path

from fedsim.data.sources import FieldMap, load_records
from fedsim.data.synthetic import (
    CATEGORIES,
    OPPOSITES,
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
    assert not uses_context["add"] and not uses_context["parity"]


def test_answers_are_correct() -> None:
    opposite = dict(OPPOSITES) | {b: a for a, b in OPPOSITES}
    for r in generate_instructions(400, seed=2):
        words, response = r["context"].split(), r["response"]
        match r["category"]:
            case "uppercase":
                assert response == r["context"].upper()
            case "reverse_words":
                assert response.split() == words[::-1]
            case "sort_numbers":
                assert response.split() == [str(n) for n in sorted(map(int, words))]
            case "add":
                a, b = (int(w.strip("?")) for w in r["instruction"].split()[2::2])
                assert response == str(a + b)
            case "count_words":
                assert response == str(len(words))
            case "first_letters":
                assert response.split() == [w[0] for w in words]
            case "opposite":
                assert response == opposite[r["instruction"].split()[-1].strip("?")]
            case "parity":
                n = int(r["instruction"].split()[1])
                assert response == ("even" if n % 2 == 0 else "odd")


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
    for marker in ("###", "Instruction", "Response", "Question", "Answer", "opposite"):
        assert marker not in text


def test_generic_text_uses_the_task_vocabulary() -> None:
    function_words = {"the", "a", "my", "we", "and", "are", "is", "can", "sees"}
    known = set(VOCABULARY) | {w + "s" for w in VOCABULARY} | function_words

    words = {w.strip(".").lower() for line in generic_text(300, seed=0) for w in line.split()}

    assert {w for w in words if not w.isdigit()} <= known


def test_write_jsonl_loads_back(tmp_path: Path) -> None:
    records = generate_instructions(20, seed=0)
    path = tmp_path / "sub" / "quick.jsonl"

    write_jsonl(records, path)

    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert load_records(str(path), FieldMap()).num_rows == 20
