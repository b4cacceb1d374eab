"""Fuzzing the record loaders (fedsim/data/sources.py) through `fedsim partition`.

Each example writes one data file (JSON Lines, JSON, Parquet or Arrow IPC file/stream) and a
valid config pointing at it, then runs `fedsim partition`, which only loads and splits the data.
The files range from valid to hostile: fields of the wrong type, missing or null, lone surrogate
escapes, 5000-digit numbers, deep nesting, invalid UTF-8, blank and huge lines, a JSON top level
that is not a list, and Parquet/Arrow files that are truncated, bit-flipped or random bytes.
Every example must exit 0, or 2 with one `fedsim: error:` line naming the file (with its line for
a JSON Lines syntax error) or the data field, write nothing, and raise nothing.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.fuzz.fuzz_support import FAST, LONG, fuzz_cli

FIELDS = ("instruction", "context", "response", "category")
CATEGORIES = ("add", "greet", "sort")
ODD_TEXT = ("", " ", "\ud800", "\udfff", "a\0b", "\u2028", "\ufeff", "é" * 50, "x" * 10_000)

texts = st.one_of(st.text(max_size=12), st.sampled_from(ODD_TEXT))
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),  # nan and inf: json.dumps writes NaN and Infinity, which json.loads accepts
    texts,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
valid_records = st.fixed_dictionaries(
    {"instruction": st.text(min_size=1, max_size=8), "response": st.text(max_size=8)},
    optional={"context": st.text(max_size=8), "category": st.sampled_from(CATEGORIES)},
)
odd_records = st.dictionaries(
    st.one_of(st.sampled_from(FIELDS), texts), st.one_of(json_values, texts), max_size=5
)
records = st.one_of(valid_records, valid_records, odd_records)

JSONL_LINES = (
    "",
    "   ",
    "{",
    "[1, 2]",
    "null",
    "NaN",
    '{"instruction": "a", "response": "b", "n": ' + "9" * 5000 + "}",
    "[" * 5000 + "]" * 5000,
    '{"instruction": "a\\ud800", "response": "b"}',
    '{"instruction": "a", "response": "b"} {"x": 1}',
    '{"instruction": "a", "instruction": 5, "response": "b"}',
    '{"instruction": "' + "x" * 200_000 + '", "response": "b"}',
)
jsonl_lines = st.one_of(
    records.map(json.dumps),
    records.map(json.dumps),
    st.sampled_from(JSONL_LINES),
    st.text(max_size=20),
)


@st.composite
def jsonl_files(draw: st.DrawFn) -> bytes:
    """Random lines, or valid records with at most one odd line among them."""
    if draw(st.booleans()):
        lines = draw(st.lists(jsonl_lines, max_size=8))
    else:
        lines = draw(st.lists(valid_records.map(json.dumps), min_size=2, max_size=6))
        for line in draw(st.lists(jsonl_lines, max_size=1)):
            lines.insert(draw(st.integers(0, len(lines))), line)
    text = draw(st.sampled_from(["\n", "\r\n"])).join(lines)
    return text.encode("utf-8", "surrogatepass")  # a raw lone surrogate: invalid UTF-8


json_files = st.one_of(
    st.lists(records, max_size=8).map(json.dumps),
    st.lists(valid_records, min_size=2, max_size=6).map(json.dumps),
    json_values.map(json.dumps),  # a top level that is not a list (or a list of non-objects)
    st.sampled_from(["[" * 5000 + "]" * 5000, "[" + "9" * 5000 + "]", "[", "", "[]"]),
).map(lambda text: text.encode("utf-8", "surrogatepass"))


def column_values(n: int) -> st.SearchStrategy[pa.Array]:
    """A column of n values of one of the types a Parquet or Arrow file may hold."""
    strings = st.lists(st.text(max_size=8), min_size=n, max_size=n)
    return st.one_of(
        strings.map(lambda v: pa.array(v, pa.string())),
        strings.map(lambda v: pa.array(v, pa.large_string())),
        strings.map(lambda v: pa.array(v).dictionary_encode()),
        st.lists(st.none() | st.text(max_size=4), min_size=n, max_size=n).map(pa.array),
        st.lists(st.integers(-5, 5), min_size=n, max_size=n).map(pa.array),
        st.lists(st.binary(max_size=4), min_size=n, max_size=n).map(pa.array),
        st.just(pa.nulls(n)),
        st.lists(st.lists(st.text(max_size=3), max_size=2), min_size=n, max_size=n).map(pa.array),
    )


@st.composite
def tables(draw: st.DrawFn) -> pa.Table:
    n = draw(st.integers(0, 6))
    names = draw(
        st.lists(st.sampled_from([*FIELDS, *FIELDS[:3], "other"]), min_size=0, max_size=5)
    )  # repeats: duplicate column names
    return pa.Table.from_arrays([draw(column_values(n)) for _ in names], names=names)


@st.composite
def valid_tables(draw: st.DrawFn) -> pa.Table:
    """instruction and response strings, maybe context and category of any type, 2-6 rows."""
    n = draw(st.integers(2, 6))
    strings = st.lists(st.text(min_size=1, max_size=8), min_size=n, max_size=n)
    columns = {"instruction": pa.array(draw(strings)), "response": pa.array(draw(strings))}
    for name in draw(st.lists(st.sampled_from(FIELDS[1::2]), unique=True)):
        columns[name] = draw(column_values(n))
    return pa.table(columns)


def table_bytes(table: pa.Table, layout: str) -> bytes:
    sink = io.BytesIO()
    if layout == "parquet":
        pq.write_table(table, sink)
    elif layout == "arrow-file":
        feather.write_feather(table, sink, compression="uncompressed")
    else:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return sink.getvalue()


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` intact, truncated, with bytes overwritten, or with junk appended."""
    how = draw(st.sampled_from(["intact", "intact", "truncate", "overwrite", "append"]))
    if how == "intact" or not data:
        return data
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        return data[:at]
    junk = draw(st.binary(min_size=1, max_size=8))
    if how == "append":
        return data + junk
    return data[:at] + junk + data[at + len(junk) :]


def columnar_files(layout: str) -> st.SearchStrategy[bytes]:
    written = st.one_of(tables(), valid_tables()).map(lambda t: table_bytes(t, layout))
    return st.one_of(written.flatmap(damaged), st.binary(max_size=64))


FORMATS = {
    "jsonl": jsonl_files(),
    "json": json_files,
    "parquet": columnar_files("parquet"),
    "arrow": columnar_files("arrow-file"),
    "arrow-stream": columnar_files("arrow-stream"),
}
SUFFIX = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet"}


def check_partition(workdir: Path, layout: str, content: bytes) -> None:
    data = workdir / f"records{SUFFIX.get(layout, '.arrow')}"
    data.write_bytes(content)
    config = workdir / "experiment.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "fuzz", "output_dir": str(workdir / "runs")},
                "data": {"source": str(data), "num_clients": 2, "partition": {"kind": "iid"}},
                "model": {"name_or_path": "tiny"},
                "server": {"clients_per_round": 1},
            }
        )
    )

    def names_input(message: str) -> bool:
        return message.startswith((str(data), "data."))

    result = fuzz_cli(["partition", str(config)], workdir, [data, config], names_input)
    if result.code == 2:
        assert len(result.err.splitlines()) == 1, result.err
        if layout == "jsonl" and "not valid JSON" in result.err:
            assert re.search(rf"{re.escape(str(data))}:\d+: not valid JSON", result.err)
    else:
        assert result.out.startswith("2 clients, "), result.out


@pytest.mark.parametrize("layout", sorted(FORMATS))
@settings(FAST, max_examples=120)
@given(data=st.data())
def test_partition_survives_random_data_files(
    workdir: Path, layout: str, data: st.DataObject
) -> None:
    check_partition(workdir, layout, data.draw(FORMATS[layout], label="file"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(FORMATS))
@settings(LONG, max_examples=2000)
@given(data=st.data())
def test_partition_survives_random_data_files_long(
    workdir: Path, layout: str, data: st.DataObject
) -> None:
    check_partition(workdir, layout, data.draw(FORMATS[layout], label="file"))


def test_a_valid_file_is_partitioned(workdir: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"instruction": f"q{i}", "response": "a", "category": CATEGORIES[i % 3]} for i in range(6)
    ]
    check_partition(workdir, "jsonl", "\n".join(map(json.dumps, rows)).encode())


# --- split files (data.partition.kind: split_file): fedsim/data/partitioners.py SplitFile -------

line_numbers = st.one_of(
    st.integers(-2, 8),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.booleans(),
    st.floats(),
    texts,
)
split_values = st.one_of(
    st.fixed_dictionaries(
        {"clients": st.lists(st.lists(line_numbers, max_size=4), max_size=3)},
        optional={"test": st.lists(line_numbers, max_size=3) | json_values},
    ),
    st.fixed_dictionaries(  # two valid clients over the 6 records, maybe a test list
        {"clients": st.permutations(range(6)).map(lambda p: [sorted(p[:2]), sorted(p[2:4])])},
        optional={"test": st.just([5])},
    ),
    json_values,
)
split_files = st.one_of(
    split_values.map(json.dumps).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.sampled_from(["[" * 5000, '{"clients": [[' + "9" * 5000 + "]]}", "", "{"]).map(str.encode),
    st.binary(max_size=32),
)


def check_split_file(workdir: Path, content: bytes) -> None:
    rows = [
        {"instruction": f"q{i}", "response": "a", "category": CATEGORIES[i % 3]} for i in range(6)
    ]
    data = workdir / "records.jsonl"
    data.write_text("\n".join(map(json.dumps, rows)))
    split = workdir / "split.json"
    split.write_bytes(content)
    config = workdir / "experiment.yaml"
    partition = {"kind": "split_file", "path": str(split)}
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "fuzz", "output_dir": str(workdir / "runs")},
                "data": {"source": str(data), "num_clients": 2, "partition": partition},
                "model": {"name_or_path": "tiny"},
                "server": {"clients_per_round": 1},
            }
        )
    )

    def names_input(message: str) -> bool:
        return message.startswith((str(split), "data."))

    result = fuzz_cli(["partition", str(config)], workdir, [data, split, config], names_input)
    if result.code == 2:
        assert len(result.err.splitlines()) == 1, result.err


@settings(FAST, max_examples=150)
@given(content=split_files)
# Crashes the fuzzer found (each an uncaught exception before the fix):
@example(content=b'{"clients": [[18446744073709551616]]}')  # OverflowError in the int64 array
@example(content=b'{"clients": [[' + b"9" * 5000 + b"]]}")  # ValueError: int() digit limit
@example(content=b"[" * 5000)  # RecursionError in the JSON decoder
def test_partition_survives_random_split_files(workdir: Path, content: bytes) -> None:
    check_split_file(workdir, content)


@pytest.mark.slow
@settings(LONG, max_examples=2000)
@given(content=split_files)
def test_partition_survives_random_split_files_long(workdir: Path, content: bytes) -> None:
    check_split_file(workdir, content)
