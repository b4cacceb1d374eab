"""Built-in instruction data, generated from a seed: no network, no download.

Eight categories of short string tasks that a tiny 2-layer transformer can learn, so that federated
LoRA tuning visibly lowers the loss on a laptop. The categories give partitioners a real label to
skew on. `generic_text` provides plain sentences over the same words for pretraining the tiny base
model; it never contains prompt templates or task phrasing.
"""

import json
import random
from collections.abc import Callable
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

Record = dict[str, str]


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def _uppercase(rng: random.Random) -> Record:
    words = _words(rng, 2, 4)
    return _record(
        "Write these words in capital letters.", " ".join(words), " ".join(words).upper()
    )


def _reverse_words(rng: random.Random) -> Record:
    words = _words(rng, 2, 4)
    return _record("Reverse the order of these words.", " ".join(words), " ".join(reversed(words)))


def _sort_numbers(rng: random.Random) -> Record:
    numbers = [rng.randint(0, 20) for _ in range(rng.randint(3, 5))]
    return _record(
        "Sort these numbers from smallest to largest.",
        " ".join(map(str, numbers)),
        " ".join(map(str, sorted(numbers))),
    )


def _add(rng: random.Random) -> Record:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return _record(f"What is {a} plus {b}?", "", str(a + b))


def _count_words(rng: random.Random) -> Record:
    words = _words(rng, 1, 6)
    return _record("How many words are in this text?", " ".join(words), str(len(words)))


def _first_letters(rng: random.Random) -> Record:
    words = _words(rng, 2, 5)
    return _record(
        "Write the first letter of each word.", " ".join(words), " ".join(w[0] for w in words)
    )


def _opposite(rng: random.Random) -> Record:
    word = rng.choice(sorted(_OPPOSITE))
    return _record(f"What is the opposite of {word}?", "", _OPPOSITE[word])


def _parity(rng: random.Random) -> Record:
    n = rng.randint(0, 99)
    return _record(f"Is {n} even or odd?", "", "even" if n % 2 == 0 else "odd")


def _record(instruction: str, context: str, response: str) -> Record:
    return {"instruction": instruction, "context": context, "response": response}


TASKS: dict[str, Callable[[random.Random], Record]] = {
    "uppercase": _uppercase,
    "reverse_words": _reverse_words,
    "sort_numbers": _sort_numbers,
    "add": _add,
    "count_words": _count_words,
    "first_letters": _first_letters,
    "opposite": _opposite,
    "parity": _parity,
}
CATEGORIES = tuple(TASKS)


def generate_instructions(num_records: int, seed: int) -> list[Record]:
    """`num_records` records (instruction, context, response, category), the same for a seed.

    Categories are balanced to within one record and appear in shuffled order.
    """
    if num_records < 0:
        raise ValueError(f"num_records must be >= 0, got {num_records}")
    rng = random.Random(seed)
    categories = [CATEGORIES[i % len(CATEGORIES)] for i in range(num_records)]
    rng.shuffle(categories)
    return [TASKS[c](rng) | {"category": c} for c in categories]


def generic_text(num_lines: int, seed: int) -> list[str]:
    """`num_lines` plain English-like lines over the task vocabulary and small numbers.

    Pretraining text for the tiny base model: it teaches words, numbers and capitals, but holds
    no instructions, templates or task answers.
    """
    rng = random.Random(seed)
    return [_generic_line(rng) for _ in range(num_lines)]


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
