"""Load instruction data from a file or the Hugging Face hub into the record table.

Formats: JSON Lines, a JSON list of objects, Parquet, Arrow IPC (file or stream), and hub datasets.
Every problem raises `FedsimInputError` with one line naming the file (and line or record) and
what was expected, so a bad data file fails before any training starts.
"""

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fedsim.data import records
from fedsim.errors import FedsimInputError

FORMATS = ("auto", "jsonl", "json", "parquet", "arrow", "hub")

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
}

# `owner/name`, as on the hub; anything else that does not exist is taken for a missing file.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class FieldMap:
    """Which source field fills each record column; `None` leaves an optional column empty."""

    instruction: str = "instruction"
    context: str | None = "context"
    response: str = "response"
    category: str | None = "category"

    def mapping(self) -> list[tuple[str, str | None, bool]]:
        """(record column, source field, required) for each record column."""
        return [
            (records.INSTRUCTION, self.instruction, True),
            (records.CONTEXT, self.context, False),
            (records.RESPONSE, self.response, True),
            (records.CATEGORY, self.category, False),
        ]


def load_records(source: str, fields: FieldMap, fmt: str = "auto") -> pa.Table:
    """Load `source` (a file path or a hub id) into a record table (see `fedsim.data.records`).

    `fmt` is one of auto, jsonl, json, parquet, arrow, hub; `auto` picks by file extension and
    treats an `owner/name` that is not a local path as a hub dataset id.
    """
    if fmt not in FORMATS:
        raise FedsimInputError(
            f"data.format: unknown format '{fmt}'; expected one of " + ", ".join(FORMATS)
        )
    if fmt == "auto":
        fmt = _detect_format(source)
    if fmt == "hub":
        return _from_arrow(_read_hub(source), source, fields)

    path = Path(source).expanduser()
    if not path.exists():
        raise FedsimInputError(f"data.source: file not found: {source}")
    if not path.is_file():
        raise FedsimInputError(f"data.source: not a file: {source}")
    if fmt == "jsonl":
        return _from_rows(_read_jsonl(path), str(path), fields)
    if fmt == "json":
        return _from_rows(_read_json(path), str(path), fields)
    if fmt == "parquet":
        return _from_arrow(_read_parquet(path), str(path), fields)
    return _from_arrow(_read_arrow(path), str(path), fields)


def _detect_format(source: str) -> str:
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.exists():
        if suffix in _EXTENSIONS:
            return _EXTENSIONS[suffix]
        raise FedsimInputError(
            f"data.source: cannot tell the format of {source}; expected an extension among "
            + ", ".join(_EXTENSIONS)
            + " or an explicit data.format"
        )
    looks_local = suffix in _EXTENSIONS or source.startswith(("./", "../", "~", "/"))
    if not looks_local and _HUB_ID.match(source):
        return "hub"
    raise FedsimInputError(f"data.source: file not found: {source}")


# --- readers: each yields (where, source_index, record) or returns an Arrow table ---------------


def _read_jsonl(path: Path) -> Iterator[tuple[str, int, Any]]:
    # Parsed line by line (not with pyarrow's reader) so a bad line is reported by number.
    try:
        with path.open(encoding="utf-8") as f:
            for index, line in enumerate(f):
                if not line.strip():
                    continue  # skipped, but counted: source_index stays the line number
                where = f"{path}:{index + 1}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FedsimInputError(f"{where}: not valid JSON ({e.msg})") from None
                yield where, index, obj
    except UnicodeDecodeError as e:
        raise FedsimInputError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise FedsimInputError(f"data.source: cannot read {path} ({e.strerror})") from None


def _read_json(path: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise FedsimInputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise FedsimInputError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise FedsimInputError(f"data.source: cannot read {path} ({e.strerror})") from None
    if not isinstance(data, list):
        raise FedsimInputError(
            f"{path}: expected a JSON list of record objects, got {type(data).__name__}"
        )
    for index, obj in enumerate(data):
        yield f"{path}: record {index}", index, obj


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise FedsimInputError(f"{path}: not a readable Parquet file ({e})") from None


def _read_arrow(path: Path) -> pa.Table:
    # Arrow IPC comes in two layouts (file with footer, or stream); accept both.
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError):
        pass
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise FedsimInputError(f"{path}: not a readable Arrow IPC file or stream ({e})") from None


def _read_hub(source: str) -> pa.Table:
    import datasets  # imported here: slow to import, and only hub sources need it

    try:
        dataset = datasets.load_dataset(source, split="train")
        return dataset.with_format("arrow")[:]
    except Exception as e:  # datasets raises many unrelated types (network, auth, not found)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FedsimInputError(
            f"data.source: cannot load hub dataset {source} ({reason}): offline?"
        ) from None


# --- conversion to the record table ---------------------------------------------------------------


def _from_rows(rows: Iterable[tuple[str, int, Any]], path: str, fields: FieldMap) -> pa.Table:
    mapping = fields.mapping()
    columns: dict[str, list] = {name: [] for name in records.SCHEMA.names}
    for where, index, obj in rows:
        if not isinstance(obj, dict):
            raise FedsimInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for column, field, required in mapping:
            value = obj.get(field) if field is not None else ""
            if value is None:
                if required:
                    if field in obj:
                        raise FedsimInputError(
                            f"{where}: field '{field}' is null; expected a string "
                            f"(data.fields.{column})"
                        )
                    raise FedsimInputError(
                        f"{where}: record has no field '{field}' (data.fields.{column})"
                    )
                value = ""
            elif not isinstance(value, str):
                raise FedsimInputError(
                    f"{where}: field '{field}' is {type(value).__name__}; expected a string "
                    f"(data.fields.{column})"
                )
            columns[column].append(value)
        columns[records.SOURCE_INDEX].append(index)
    if not columns[records.SOURCE_INDEX]:
        raise FedsimInputError(f"{path}: no records")
    return pa.table(columns, schema=records.SCHEMA)


def _from_arrow(table: pa.Table, path: str, fields: FieldMap) -> pa.Table:
    # Column-wise: checks and conversion stay vectorised for large Parquet/Arrow/hub tables.
    if table.num_rows == 0:
        raise FedsimInputError(f"{path}: no records")
    columns: dict[str, pa.Array] = {}
    for column, field, required in fields.mapping():
        if field is None or field not in table.column_names:
            if required:
                raise FedsimInputError(
                    f"{path}: record 0 has no field '{field}' (data.fields.{column}); "
                    f"columns are {', '.join(table.column_names)}"
                )
            columns[column] = pa.array([""] * table.num_rows, pa.string())
            continue
        values = table.column(field)
        if pa.types.is_null(values.type) and not required:
            values = pa.chunked_array([pa.array([""] * table.num_rows, pa.string())])
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise FedsimInputError(
                f"{path}: field '{field}' has type {values.type}; expected strings "
                f"(data.fields.{column})"
            )
        if values.null_count:
            if required:
                first = pc.index(pc.is_null(values), True).as_py()
                raise FedsimInputError(
                    f"{path}: record {first}: field '{field}' is null; expected a string "
                    f"(data.fields.{column})"
                )
            values = pc.fill_null(values, "")
        columns[column] = values.cast(pa.string())
    columns[records.SOURCE_INDEX] = pa.array(range(table.num_rows), pa.int64())
    return pa.table(columns, schema=records.SCHEMA)
