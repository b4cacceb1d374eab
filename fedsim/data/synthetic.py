"""Built-in instruction data, generated from a seed: no network, no download.

Eight categories of short string tasks whose answers are deterministic functions of the input,
so that exact match is a meaningful score and a tiny transformer can reach it. The categories give
partitioners a real label to skew on.

`generic_text` is the tiny base model's pretraining text: plain sentences over the same words
and, as a real LLM has met tasks like these before any instruction tuning, task instances written
as plain text (``Write this word in capital letters. green -> GREEN``), drawn from the text's own
random stream. It never holds a prompt template: instruction tuning still has to teach the model
to answer inside the template, stop after the answer, and which categories it is asked about.
"""

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path


def _split(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NOUNS = _split(
    "cat dog bird fish horse cow sheep pig lion bear tree flower grass river lake sea sun moon "
    "star sky rain snow wind cloud house door window table chair bed book pen paper cup plate "
    "bread apple milk water tea cake egg rice car bus train boat road street city town farm "
    "school shop park garden hill mountain stone box ball game song friend mother father child "
    "teacher doctor king queen baby girl boy hand foot head eye hat shoe coat bag key clock"
)
ADJECTIVES = _split(
    "red blue green yellow brown little warm cool pretty kind busy calm funny tall round"
)
VERBS = _split("see like find want need help make hold paint draw build wash carry keep move")

# Antonym pairs for the "opposite" task; every word appears once, so the map works both ways.
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("dark", "bright"), ("old", "young"), ("open", "closed"), ("left", "right"), ("high", "low"),
    ("long", "short"), ("early", "late"), ("hard", "soft"), ("wet", "dry"), ("full", "empty"),
    ("rich", "poor"), ("strong", "weak"), ("clean", "dirty"), ("loud", "quiet"), ("day", "night"),
    ("black", "white"), ("in", "out"), ("on", "off"), ("yes", "no"), ("first", "last"),
    ("good", "bad"), ("thick", "thin"), ("heavy", "light"), ("push", "pull"), ("win", "lose"),
    ("buy", "sell"), ("give", "take"), ("love", "hate"), ("start", "finish"), ("near", "far"),
    ("true", "false"), ("sweet", "sour"), ("cheap", "expensive"), ("north", "south"),
    ("east", "west"),
)  # fmt: skip
_OPPOSITE = {a: b for a, b in OPPOSITES} | {b: a for a, b in OPPOSITES}

# Task inputs draw from nouns, adjectives and verbs; with the antonyms, about 190 words in all.
WORDS = NOUNS + ADJECTIVES + VERBS
VOCABULARY = tuple(sorted(set(WORDS) | set(_OPPOSITE)))

BUILTIN_VERSION = 2
"""Version of the generated tasks and pretraining text (2: the miniature's eight tasks). Bump it
with any change to what `generate_instructions` returns: the data fingerprint names versions
above 2, so a run made with other records refuses `--resume` instead of silently diverging."""

Record = dict[str, str]
Skill = tuple[str, str, str]
"""(category, input, answer) of one task instance, before any wording."""


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


# --- skills: (input, answer) pairs, shared by the instructions and the pretraining text ---------


def _uppercase(rng: random.Random) -> tuple[str, str]:
    # Adjectives and verbs only: 30 words whose capitals the tiny model learns in pretraining
    # (over all 190 words it had not, after 1500 steps).
    word = rng.choice(ADJECTIVES + VERBS)
    return word, word.upper()


def _subtract(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 9)
    b = rng.randint(0, a)
    return f"{a} {b}", str(a - b)


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 9) for _ in range(3)]
    return " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} {b}", str(a + b)


def _next_number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 98)
    return str(n), str(n + 1)


def _count_words(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 1, 6)
    return " ".join(words), str(len(words))


def _opposite(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(sorted(_OPPOSITE))
    return word, _OPPOSITE[word]


def _parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 99)
    return str(n), "even" if n % 2 == 0 else "odd"


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "uppercase": _uppercase,
    "subtract": _subtract,
    "sort_numbers": _sort_numbers,
    "add": _add,
    "next_number": _next_number,
    "count_words": _count_words,
    "opposite": _opposite,
    "parity": _parity,
}
CATEGORIES = tuple(SKILLS)


# --- instructions: how each skill is asked for in the instruction data -------------------------


def _record(instruction: str, context: str, response: str) -> Record:
    return {"instruction": instruction, "context": context, "response": response}


# The instruction of each category: `{x}` is the input; categories without `{x}` take the input
# in the context field.
INSTRUCTIONS = {
    "uppercase": "Write this word in capital letters.",
    "subtract": "What is {a} minus {b}?",
    "sort_numbers": "Sort these numbers from smallest to largest.",
    "add": "What is {a} plus {b}?",
    "next_number": "Which number comes after {x}?",
    "count_words": "How many words are in this text?",
    "opposite": "What is the opposite of {x}?",
    "parity": "Is {x} even or odd?",
}


def _fill(pattern: str, text: str, answer: str) -> str:
    a, _, b = text.partition(" ")
    return pattern.format(x=text, y=answer, a=a, b=b)


def _instruction(category: str, text: str, answer: str) -> Record:
    """The instruction record asking for `category` on `text`."""
    pattern = INSTRUCTIONS[category]
    if "{" in pattern:
        return _record(_fill(pattern, text, answer), "", answer)
    return _record(pattern, text, answer)


def generate_instructions(num_records: int, seed: int) -> list[Record]:
    """`num_records` records (instruction, context, response, category), the same for a seed.

    Categories are balanced to within one record and appear in shuffled order.
    """
    return list(iter_instructions(num_records, seed))


def iter_instructions(num_records: int, seed: int) -> Iterator[Record]:
    """`generate_instructions`' records one at a time, so that a million of them can go to Arrow
    in batches without ever being Python objects all at once."""
    if num_records < 0:
        raise ValueError(f"num_records must be >= 0, got {num_records}")
    rng = random.Random(seed)
    categories = [CATEGORIES[i % len(CATEGORIES)] for i in range(num_records)]
    rng.shuffle(categories)
    for c in categories:
        yield _instruction(c, *SKILLS[c](rng)) | {"category": c}


# --- pretraining text ---------------------------------------------------------------------------


def generic_text(num_lines: int, seed: int) -> list[str]:
    """`num_lines` lines of pretraining text for the tiny base model, the same for a seed.

    A quarter are plain English-like sentences over the task vocabulary and small numbers; the
    rest each hold a few task instances written as `skill_statement` writes them, drawn from the
    text's own random stream: never a prompt template, never the instruction data's records.
    """
    rng = random.Random(seed)
    return [_generic_line(rng) if i % 4 == 0 else _skill_line(rng) for i in range(num_lines)]


def skill_statement(category: str, rng: random.Random) -> str:
    """One task instance as the pretraining text writes it: the instruction's wording and input,
    then ``->`` and the answer (``Write this word in capital letters. moon -> MOON``)."""
    record = _instruction(category, *SKILLS[category](rng))
    question = f"{record['instruction']} {record['context']}".rstrip()
    return f"{question} -> {record['response']}"


def _skill_line(rng: random.Random) -> str:
    count = rng.randint(2, 4)
    return " | ".join(skill_statement(rng.choice(CATEGORIES), rng) for _ in range(count))


def _generic_line(rng: random.Random) -> str:
    noun, other, adjective, verb = (
        rng.choice(NOUNS),
        rng.choice(NOUNS),
        rng.choice(ADJECTIVES),
        rng.choice(VERBS),
    )
    kind = rng.randrange(8)
    if kind == 0:
        return f"the {adjective} {noun} can {verb} the {other}."
    if kind == 1:
        return f"a {noun} and a {other} are {adjective}."
    if kind == 2:
        return f"my {noun} is {rng.choice(VOCABULARY)} and {adjective}."
    if kind == 3:
        return f"The {noun} sees {rng.randint(0, 99)} {other}s."
    if kind == 4:
        return " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(3, 8)))
    if kind == 5:  # capitals, so the base model knows upper-case words too
        return " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(2, 5))).upper()
    if kind == 6:
        return " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 6)))
    start = rng.randint(0, 90)
    return " ".join(str(start + i) for i in range(rng.randint(3, 6)))


def write_jsonl(records: list[Record], path: str | Path) -> None:
    """Write records as JSON Lines (UTF-8, one object per line), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
