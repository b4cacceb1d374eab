"""Load instruction data from a file or the Hugging Face hub into the record table.

Formats: JSON Lines, a JSON list of objects, Parquet, Arrow IPC (file or stream), and hub datasets.
Every problem raises `FedsimInputError` with one line naming the file (and line or record) and
what was expected, so a bad data file fails before any training starts.
"""

import json
import re
from collections.abc import Callable, Iterable, Iterator
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
                yield where, index, _parse_json(line, where)
    except UnicodeDecodeError as e:
        line_number = _first_undecodable_line(path)
        where = f"{path}:{line_number}" if line_number else str(path)
        raise FedsimInputError(f"{where}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise FedsimInputError(f"data.source: cannot read {path} ({e.strerror})") from None


def _parse_json(text: str, where: str, with_line: bool = False) -> Any:
    """`json.loads`, with each way it fails as one error line naming `where` (and the line of a
    syntax error, for a whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"{where}:{e.lineno}" if with_line else where
        raise FedsimInputError(f"{at}: not valid JSON ({e.msg})") from None
    except RecursionError:  # [[[[...: the decoder recurses once per level
        raise FedsimInputError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # an integer of over 4300 digits, which int() refuses to build
        raise FedsimInputError(f"{where}: not valid JSON ({_first_line(e)})") from None


def _first_undecodable_line(path: Path) -> int | None:
    """1-based number of the first line that is not UTF-8: the text reader decodes in blocks, so
    its error gives an offset into a block, not a line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def _first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (Arrow's can span several: a schema dump)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_json(path: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        with path.open(encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        line_number = _first_undecodable_line(path)
        where = f"{path}:{line_number}" if line_number else str(path)
        raise FedsimInputError(f"{where}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise FedsimInputError(f"data.source: cannot read {path} ({e.strerror})") from None
    data = _parse_json(text, str(path), with_line=True)
    if not isinstance(data, list):
        raise FedsimInputError(
            f"{path}: expected a JSON list of record objects, got {type(data).__name__}"
        )
    for index, obj in enumerate(data):
        yield f"{path}: record {index}", index, obj


def _read_parquet(path: Path) -> pa.Table:
    # ParquetFile, not pq.read_table: the dataset reader behind read_table fails on duplicate
    # column names with a schema dump, and _from_arrow says which column it is instead.
    return _validated(lambda: pq.ParquetFile(path).read(), path, "Parquet file")


def _read_arrow(path: Path) -> pa.Table:
    return _validated(lambda: _read_ipc(path), path, "Arrow IPC file or stream")


def _validated(read: Callable[[], pa.Table], path: Path, kind: str) -> pa.Table:
    """The table `read()` returns, fully validated: neither format checks on reading that
    strings are UTF-8 or that buffers are as long as their offsets say. Any failure is one
    line naming the file."""
    try:
        table = read()
        table.validate(full=True)
    except UnicodeDecodeError:  # pyarrow decodes a column name when it is first asked for
        raise FedsimInputError(
            f"{path}: not a readable {kind} (a column name is not UTF-8)"
        ) from None
    except (pa.ArrowException, OSError) as e:
        raise FedsimInputError(f"{path}: not a readable {kind} ({_first_line(e)})") from None
    return table


def _read_ipc(path: Path) -> pa.Table:
    # Arrow IPC comes in two layouts (file with footer, or stream); accept both.
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError):
        pass
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


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
            elif not _is_unicode(value):
                raise FedsimInputError(
                    f"{where}: field '{field}' is not valid Unicode text (a lone surrogate "
                    f"escape such as \\ud800); expected a string (data.fields.{column})"
                )
            columns[column].append(value)
        columns[records.SOURCE_INDEX].append(index)
    if not columns[records.SOURCE_INDEX]:
        raise FedsimInputError(f"{path}: no records")
    return pa.table(columns, schema=records.SCHEMA)


def _is_unicode(text: str) -> bool:
    """Whether `text` can be stored as UTF-8: JSON's \\ud800 escape decodes to a lone surrogate,
    which Python strings hold and Arrow (and every tokenizer) cannot."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _from_arrow(table: pa.Table, path: str, fields: FieldMap) -> pa.Table:
    # Column-wise: checks and conversion stay vectorised for large Parquet/Arrow/hub tables.
    if table.num_rows == 0:
        raise FedsimInputError(f"{path}: no records")
    for _, field, _ in fields.mapping():
        count = table.column_names.count(field)
        if count > 1:  # table.column(name) would raise KeyError
            raise FedsimInputError(f"{path}: column '{field}' appears {count} times")
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
