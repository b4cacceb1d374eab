"""Tokenised client shards in one memory-mapped Arrow IPC file.

The driver tokenises the training records once and writes `train.arrow` (columns `client`,
`input_ids`, `labels`; rows grouped by client, in client order) plus `index.json` with each
client's row range. Workers open the file memory-mapped, so a client's examples are read straight
from the page cache without copies or per-worker parsing, however many clients there are.
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fedsim.data import records
from fedsim.data.templates import PromptTemplate
from fedsim.errors import FedsimInputError

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's CrossEntropyLoss ignore_index)
TRAIN_FILE = "train.arrow"
INDEX_FILE = "index.json"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("client", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
    ]
)


def tokenize_records(
    table: pa.Table,
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels for every record of `table`, in table order.

    As in the reference code: the text is BOS (if the tokenizer has one) + prompt + response,
    truncated to `cutoff_len` tokens, and EOS is appended when there is room (a truncated example
    gets none). Labels equal the ids; with `train_on_inputs` False the prompt's tokens are set to
    -100, the prompt length being that of the prompt tokenised alone. That length is exact only if
    the tokenizer does not merge the prompt's last character into the response's first token,
    which is why the shipped templates end their prompts with a newline.
    """
    if cutoff_len < 2:
        raise FedsimInputError(f"client.max_length: must be >= 2, got {cutoff_len}")
    columns = {name: table.column(name).to_pylist() for name in records.TEXT_COLUMNS}
    prompts = [
        template.render(instruction, context)
        for instruction, context in zip(
            columns[records.INSTRUCTION], columns[records.CONTEXT], strict=True
        )
    ]
    texts = [p + r for p, r in zip(prompts, columns[records.RESPONSE], strict=True)]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FedsimInputError("model.name_or_path: the tokenizer has no EOS token")

    # Batch calls: a fast tokenizer encodes the whole list in parallel in Rust.
    full = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if train_on_inputs:
        prompt_lengths = [0] * len(texts)
    else:
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        prompt_lengths = [len(bos) + len(ids) for ids in prompt_ids]

    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    for ids, prompt_len in zip(full, prompt_lengths, strict=True):
        ids = (bos + ids)[:cutoff_len]
        if len(ids) < cutoff_len:
            ids.append(eos)
        masked = min(prompt_len, len(ids))
        input_ids.append(ids)
        labels.append([IGNORE_INDEX] * masked + ids[masked:])
    return input_ids, labels


def tokenize_records_compact(
    table: pa.Table,
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool,
    chunk_rows: int = 4096,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`tokenize_records`, one int32 array per example, tokenising `chunk_rows` records at a time.

    The same values in a fraction of the memory: a Python list of ints costs ~40 bytes a token,
    an int32 array 4, and only one chunk's tokenizer output is alive at a time. At 80,000 records
    this keeps ~900 MB off the driver's peak.
    """
    input_ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for start in range(0, table.num_rows, chunk_rows):
        ids, labs = tokenize_records(
            table.slice(start, chunk_rows), tokenizer, template, cutoff_len, train_on_inputs
        )
        input_ids.extend(np.asarray(x, dtype=np.int32) for x in ids)
        labels.extend(np.asarray(x, dtype=np.int32) for x in labs)
    return input_ids, labels


@dataclass(frozen=True)
class ShardIndex:
    """Where each client's rows lie in `train.arrow`: rows offsets[c] .. offsets[c+1]-1."""

    num_clients: int
    offsets: list[int]

    def to_json(self) -> str:
        return json.dumps({"num_clients": self.num_clients, "offsets": self.offsets})

    @classmethod
    def from_json(cls, text: str, where: str) -> "ShardIndex":
        try:
            data = json.loads(text)
            num_clients, offsets = int(data["num_clients"]), [int(o) for o in data["offsets"]]
        except (ValueError, KeyError, TypeError) as e:
            raise FedsimInputError(f"{where}: not a valid shard index ({e})") from None
        if len(offsets) != num_clients + 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise FedsimInputError(
                f"{where}: offsets must rise from 0, one per client plus the end"
            )
        return cls(num_clients, offsets)


def write_shards(
    path: Path,
    client_positions: list[np.ndarray],
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
) -> ShardIndex:
    """Write the clients' examples (positions into `input_ids`/`labels`) under folder `path`.

    `index.json` is removed first and written last (atomically), so a reader never pairs an
    index with a half-written or stale `train.arrow`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / INDEX_FILE).unlink(missing_ok=True)

    rows = (
        np.concatenate(client_positions).astype(np.int64)
        if client_positions
        else np.empty(0, dtype=np.int64)
    )
    sizes = [len(p) for p in client_positions]
    clients = np.repeat(np.arange(len(client_positions), dtype=np.int32), sizes)
    lengths = np.fromiter((len(input_ids[i]) for i in rows), dtype=np.int64, count=len(rows))
    if any(len(labels[i]) != n for i, n in zip(rows, lengths, strict=True)):
        raise ValueError("input_ids and labels differ in length for some record")
    list_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=list_offsets[1:])
    if list_offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("more than 2**31 tokens in one shard file")
    offsets = pa.array(list_offsets.astype(np.int32))

    def flat(column: Sequence[Sequence[int]]) -> pa.Array:
        # Rows may be lists or int32 arrays (tokenize_records_compact); both concatenate.
        pieces = [np.asarray(column[i], dtype=np.int32) for i in rows]
        values = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(values))

    table = pa.table(
        {"client": pa.array(clients), "input_ids": flat(input_ids), "labels": flat(labels)},
        schema=SHARD_SCHEMA,
    )
    tmp = path / (TRAIN_FILE + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SHARD_SCHEMA) as writer:
        writer.write_table(table)
    os.replace(tmp, path / TRAIN_FILE)

    index = ShardIndex(len(client_positions), [0, *np.cumsum(sizes).tolist()])
    tmp = path / (INDEX_FILE + ".tmp")
    tmp.write_text(index.to_json(), encoding="utf-8")
    os.replace(tmp, path / INDEX_FILE)
    return index


@dataclass(frozen=True)
class ClientExamples:
    """One client's examples as flat arrays (views of the memory-mapped file, no copies).

    Example i is `input_ids[offsets[i]:offsets[i+1]]` (and the same slice of `labels`);
    `examples[i]` returns that pair. The arrays are read-only.
    """

    offsets: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        i %= len(self)
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[start:end], self.labels[start:end]

    def lengths(self) -> np.ndarray:
        """Token count of each example."""
        return np.diff(self.offsets)

    def to_lists(self) -> tuple[list[list[int]], list[list[int]]]:
        """(input_ids, labels) as Python lists, one list per example."""
        pairs = [self[i] for i in range(len(self))]
        return [ids.tolist() for ids, _ in pairs], [lab.tolist() for _, lab in pairs]


def pack_shards(path: Path) -> tuple[str, np.ndarray]:
    """(`index.json` text, `train.arrow` bytes as uint8) of the shard folder `path`, for
    `ray.put`: workers on any node open them with `ShardStore.from_buffer`."""
    path = Path(path)
    arrow = np.fromfile(path / TRAIN_FILE, dtype=np.uint8)
    return (path / INDEX_FILE).read_text(encoding="utf-8"), arrow


class ShardStore:
    """Read side of the shard store, opened by each worker on the folder `write_shards` wrote."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        index_path = path / INDEX_FILE
        if not index_path.is_file():
            raise FedsimInputError(f"{index_path}: shard index missing (shards not written yet?)")
        index_text = index_path.read_text(encoding="utf-8")
        try:
            source = pa.memory_map(str(path / TRAIN_FILE))
        except (pa.ArrowException, OSError) as e:
            raise FedsimInputError(f"{path / TRAIN_FILE}: cannot read shard file ({e})") from None
        self._open(index_text, source, path)

    @classmethod
    def from_buffer(cls, index_json: str, train_arrow: Any, where: str) -> "ShardStore":
        """The store from the contents of `index.json` and `train.arrow` held in memory (any
        object with the buffer protocol, e.g. a numpy array fetched from Ray's object store,
        read without a copy); `where` names their origin in error messages."""
        store = cls.__new__(cls)
        store._open(index_json, pa.BufferReader(pa.py_buffer(train_arrow)), Path(where))
        return store

    def _open(self, index_text: str, source: Any, path: Path) -> None:
        self.index = ShardIndex.from_json(index_text, str(path / INDEX_FILE))
        try:
            self._source = source
            self._table = pa.ipc.open_file(self._source).read_all()
        except (pa.ArrowException, OSError) as e:
            raise FedsimInputError(f"{path / TRAIN_FILE}: cannot read shard file ({e})") from None
        if self._table.schema != SHARD_SCHEMA or self._table.num_rows != self.index.offsets[-1]:
            raise FedsimInputError(
                f"{path}: {TRAIN_FILE} does not match {INDEX_FILE} "
                f"({self._table.num_rows} rows, index says {self.index.offsets[-1]})"
            )
        # client_examples slices both columns with the input_ids offsets: they must agree.
        for ids, labels in zip(
            self._table.column("input_ids").chunks,
            self._table.column("labels").chunks,
            strict=True,
        ):
            if not ids.offsets.equals(labels.offsets):
                raise FedsimInputError(f"{path / TRAIN_FILE}: input_ids and labels differ in shape")

    @property
    def num_clients(self) -> int:
        return self.index.num_clients

    def num_records(self, client_id: int) -> int:
        """Number of examples held by `client_id`."""
        start, end = self._range(client_id)
        return end - start

    def client_examples(self, client_id: int) -> ClientExamples:
        """The examples of `client_id`, in the order they were written."""
        start, end = self._range(client_id)
        rows = self._table.slice(start, end - start)
        ids = _one_chunk(rows.column("input_ids"))
        labels = _one_chunk(rows.column("labels"))
        # Written with shared offsets; sliced offsets are absolute into the unsliced values.
        offsets = ids.offsets.to_numpy()
        return ClientExamples(
            offsets=offsets,
            input_ids=ids.values.to_numpy(zero_copy_only=True),
            labels=labels.values.to_numpy(zero_copy_only=True),
        )

    def _range(self, client_id: int) -> tuple[int, int]:
        if not 0 <= client_id < self.num_clients:
            raise IndexError(f"client {client_id} out of range for {self.num_clients} clients")
        return self.index.offsets[client_id], self.index.offsets[client_id + 1]


def _one_chunk(column: pa.ChunkedArray) -> pa.ListArray:
    # A client range may span record batches; combining copies only in that case.
    if column.num_chunks == 1:
        return column.chunk(0)
    if column.num_chunks == 0:
        return pa.array([], SHARD_SCHEMA.field("input_ids").type)
    return column.combine_chunks()
