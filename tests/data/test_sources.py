"""Loading records from files: formats, field mapping, and errors that name file and line."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from fedsim.data import records
from fedsim.data.sources import FieldMap, load_records
from fedsim.errors import FedsimInputError

ROWS = [
    {"instruction": "Add the numbers.", "context": "2 3", "response": "5", "category": "add"},
    {"instruction": "Name a colour.", "context": "", "response": "red", "category": "open_qa"},
    {"instruction": "Say hi.", "response": "hi"},  # no context, no category: both optional
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_loads_records_in_order(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])

    table = load_records(str(path), FieldMap())

    assert table.schema == records.SCHEMA
    assert table.column("instruction").to_pylist() == [r["instruction"] for r in ROWS]
    assert table.column("context").to_pylist() == ["2 3", "", ""]
    assert table.column("category").to_pylist() == ["add", "open_qa", ""]
    assert table.column("source_index").to_pylist() == [0, 1, 2]


def test_blank_lines_are_skipped_but_keep_line_numbers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "", "  ", json.dumps(ROWS[1])])

    table = load_records(str(path), FieldMap())

    assert table.column("source_index").to_pylist() == [0, 3]


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(ROWS[0]), '{"instruction": "x",'])

    with pytest.raises(FedsimInputError, match=r"bad\.jsonl:2: not valid JSON"):
        load_records(str(path), FieldMap())


def test_jsonl_line_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "[1, 2]"])

    with pytest.raises(FedsimInputError, match=r"d\.jsonl:2: expected a JSON object, got list"):
        load_records(str(path), FieldMap())


def test_missing_required_field_names_line_and_config_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), '{"instruction": "x"}'])

    with pytest.raises(
        FedsimInputError,
        match=r"d\.jsonl:2: record has no field 'response' \(data\.fields\.response\)",
    ):
        load_records(str(path), FieldMap())


def test_non_string_value_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ['{"instruction": "x", "response": 5}'])

    with pytest.raises(FedsimInputError, match=r"d\.jsonl:1: field 'response' is int"):
        load_records(str(path), FieldMap())


def test_field_map_renames_and_drops_optional_columns(tmp_path: Path) -> None:
    alpaca_style = {"prompt": "Say hi.", "input": "to Bob", "output": "hi Bob", "category": "x"}
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(alpaca_style)])

    table = load_records(
        str(path), FieldMap(instruction="prompt", context="input", response="output", category=None)
    )

    assert table.to_pylist() == [
        {
            "instruction": "Say hi.",
            "context": "to Bob",
            "response": "hi Bob",
            "category": "",
            "source_index": 0,
        }
    ]


def test_json_list_of_objects(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")

    table = load_records(str(path), FieldMap())

    assert table.column("response").to_pylist() == ["5", "red", "hi"]


def test_json_that_is_not_a_list_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": ROWS}), encoding="utf-8")

    with pytest.raises(FedsimInputError, match=r"d\.json: expected a JSON list"):
        load_records(str(path), FieldMap())


def test_json_record_missing_field_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], {"response": "r"}]), encoding="utf-8")

    with pytest.raises(FedsimInputError, match=r"d\.json: record 1: record has no field 'instr"):
        load_records(str(path), FieldMap())


@pytest.mark.parametrize("suffix", [".parquet", ".arrow", ".feather"])
def test_parquet_and_arrow_round_trip(tmp_path: Path, suffix: str) -> None:
    source = pa.Table.from_pylist(ROWS[:2])
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        pq.write_table(source, path)
    else:
        feather.write_feather(source, path)

    table = load_records(str(path), FieldMap())

    assert table.schema == records.SCHEMA
    assert table.drop_columns("source_index").to_pylist() == ROWS[:2]
    assert table.column("source_index").to_pylist() == [0, 1]


def test_arrow_stream_format_is_read(tmp_path: Path) -> None:
    source = pa.Table.from_pylist(ROWS[:2])
    path = tmp_path / "d.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, source.schema) as writer:
        writer.write_table(source)

    table = load_records(str(path), FieldMap())

    assert table.column("instruction").to_pylist() == ["Add the numbers.", "Name a colour."]


def test_parquet_null_in_required_column_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "response": ["x", None]}), path)

    with pytest.raises(FedsimInputError, match=r"record 1: field 'response' is null"):
        load_records(str(path), FieldMap())


def test_parquet_missing_column_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["a"], "answer": ["x"]}), path)

    with pytest.raises(FedsimInputError, match=r"no field 'response' \(data\.fields\.response\)"):
        load_records(str(path), FieldMap())


def test_parquet_non_string_column_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["a"], "response": [3]}), path)

    with pytest.raises(FedsimInputError, match=r"field 'response' has type int64"):
        load_records(str(path), FieldMap())


@pytest.mark.parametrize("name", ["missing.jsonl", "./missing", "~/no/such/file.parquet"])
def test_missing_local_file(tmp_path: Path, name: str) -> None:
    source = str(tmp_path / name) if name == "missing.jsonl" else name

    with pytest.raises(FedsimInputError, match=r"data\.source: file not found: "):
        load_records(source, FieldMap())


def test_hub_id_that_cannot_be_loaded_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)

    with pytest.raises(FedsimInputError, match=r"cannot load hub dataset owner/name \(no network"):
        load_records("owner/name", FieldMap())


def test_unreadable_parquet_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_text("not parquet")

    with pytest.raises(FedsimInputError, match=r"d\.parquet: not a readable Parquet file"):
        load_records(str(path), FieldMap())


def test_unknown_extension_asks_for_a_format(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text(json.dumps(ROWS[0]) + "\n")

    with pytest.raises(FedsimInputError, match=r"cannot tell the format"):
        load_records(str(path), FieldMap())
    assert load_records(str(path), FieldMap(), fmt="jsonl").num_rows == 1


def test_dolly_loads_every_line(dolly_table: pa.Table) -> None:
    assert dolly_table.num_rows == 15011
    assert dolly_table.column("source_index").to_pylist() == list(range(15011))
    assert len(set(dolly_table.column("category").to_pylist())) == 8


# --- malformed files: one line naming the file (and line), never another exception -------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"instruction": "a", "response": "b", "n": ' + "9" * 5000 + "}", "digits"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
    ids=["5000-digit-int", "deep-nesting"],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_that_python_cannot_build_names_the_file(tmp_path, suffix, text, reason) -> None:
    path = tmp_path / f"d{suffix}"
    lines = [json.dumps(ROWS[0]), text] if suffix == ".jsonl" else [f"[{text}]"]
    write_jsonl(path, lines)
    where = f"{path}:2" if suffix == ".jsonl" else f"{path}"

    with pytest.raises(FedsimInputError) as info:
        load_records(str(path), FieldMap())

    message = str(info.value)
    assert message.startswith(f"{where}: not valid JSON (") and reason in message, message


def test_lone_surrogate_in_a_field_names_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ['{"instruction": "a\\ud800", "response": "b"}'])

    with pytest.raises(
        FedsimInputError, match=r"d\.jsonl:1: field 'instruction' is not valid Unicode text"
    ):
        load_records(str(path), FieldMap())


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    good = json.dumps(ROWS[0]).encode() + b"\n"
    path.write_bytes(good * 2 + b'{"instruction": "caf\xe9", "response": "b"}\n' + good)

    with pytest.raises(FedsimInputError, match=r"d\.jsonl:3: not UTF-8 text"):
        load_records(str(path), FieldMap())


def _invalid_utf8_table() -> pa.Table:
    """A string column whose bytes are not UTF-8: Arrow writes and reads it without checking."""
    offsets = pa.py_buffer(np.array([0, 2], dtype=np.int32).tobytes())
    text = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"\xff\xfe")])
    return pa.table({"instruction": text, "response": pa.array(["x"])})


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_invalid_utf8_in_a_columnar_file_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        pq.write_table(_invalid_utf8_table(), path)
    else:
        feather.write_feather(_invalid_utf8_table(), path, compression="uncompressed")

    with pytest.raises(FedsimInputError, match=rf"d\{suffix}: .*UTF-?8"):
        load_records(str(path), FieldMap())


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_duplicate_column_is_one_line_naming_it(tmp_path: Path, suffix: str) -> None:
    columns = [pa.array(["a"]), pa.array(["b"]), pa.array(["c"])]
    table = pa.Table.from_arrays(columns, names=["instruction", "instruction", "response"])
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        pq.write_table(table, path)
    else:
        feather.write_feather(table, path)

    with pytest.raises(FedsimInputError) as info:
        load_records(str(path), FieldMap())

    assert str(info.value) == f"{path}: column 'instruction' appears 2 times"


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_column_name_that_is_not_utf8_is_refused(tmp_path: Path, suffix: str) -> None:
    # Found by tests/fuzz/test_fuzz_sources.py: pyarrow raised UnicodeDecodeError reading the
    # name. The name is patched in place, same length, so the file stays well formed.
    table = pa.table({"instruction": ["a"], "response": ["b"], "zzzzzz": ["c"]})
    sink = pa.BufferOutputStream()
    if suffix == ".parquet":
        pq.write_table(table, sink, store_schema=False)
    else:
        feather.write_feather(table, sink, compression="uncompressed")
    path = tmp_path / f"d{suffix}"
    path.write_bytes(sink.getvalue().to_pybytes().replace(b"zzzzzz", b"\x80" * 6))

    with pytest.raises(FedsimInputError, match=rf"d\{suffix}: .*column name is not UTF-8"):
        load_records(str(path), FieldMap())
