"""The record table: every data source is loaded into this one Arrow schema.

A record is one instruction example. `context` (the optional input) and `category` may be empty
strings. `source_index` is the 0-based row (or line) number in the source, so that split files
naming source lines map onto the table exactly, whatever rows were skipped.
"""

import pyarrow as pa

INSTRUCTION = "instruction"
CONTEXT = "context"
RESPONSE = "response"
CATEGORY = "category"
SOURCE_INDEX = "source_index"

TEXT_COLUMNS: tuple[str, ...] = (INSTRUCTION, CONTEXT, RESPONSE, CATEGORY)

SCHEMA = pa.schema(
    [
        pa.field(INSTRUCTION, pa.string(), nullable=False),
        pa.field(CONTEXT, pa.string(), nullable=False),
        pa.field(RESPONSE, pa.string(), nullable=False),
        pa.field(CATEGORY, pa.string(), nullable=False),
        pa.field(SOURCE_INDEX, pa.int64(), nullable=False),
    ]
)


def make_table(rows: list[dict]) -> pa.Table:
    """Build a record table from dicts with the text columns and, optionally, `source_index`.

    Missing `context`/`category` become ""; a missing `source_index` becomes the row's position.
    """
    columns: dict[str, list] = {
        INSTRUCTION: [row[INSTRUCTION] for row in rows],
        CONTEXT: [row.get(CONTEXT) or "" for row in rows],
        RESPONSE: [row[RESPONSE] for row in rows],
        CATEGORY: [row.get(CATEGORY) or "" for row in rows],
        SOURCE_INDEX: [row.get(SOURCE_INDEX, i) for i, row in enumerate(rows)],
    }
    return pa.table(columns, schema=SCHEMA)
