"""Tokenised client shards in blocks of Arrow IPC files, built lazily.

Clients are grouped into fixed blocks of `block_size` consecutive client ids; each block is one
Arrow IPC file `block_NNNNN.arrow` (columns `client`, `input_ids`, `labels`; rows grouped by
client, in client order), written under a temporary name and renamed, so a block file that exists
is complete. `index.json` holds each client's row offsets (known from the partition alone, before
any tokenising) and the block size; it is written first. The driver tokenises a block only when a
round needs one of its clients (`fedsim.data.shard_builder`), so no step ever holds every record's
tokens. Workers open a block on first use, memory-mapped (or from a buffer fetched from Ray's
object store) and keep a few open, so a client's examples are read without copies.
"""

import itertools
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fedsim import rundir
from fedsim.data import records
from fedsim.data.templates import PromptTemplate
from fedsim.errors import FedsimInputError

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's CrossEntropyLoss ignore_index)
INDEX_FILE = "index.json"
BLOCK_RECORDS = 64
"""Records a block holds on average. A round whose clients each need a new block tokenises
about this many records per client beyond their own, so blocks are kept small; a file each is
still cheap (an Arrow IPC file with its schema, ~1,250 files at 80,000 records). Measured with
benchmarks/scale.py at 10,000 clients x 8 records, 4 clients a round, round time over the
100-client run: x2.20 at 2,000 records a block, x1.25 at 256, x1.17 at 64."""
OPEN_BLOCKS = 4
"""Blocks a reader keeps open (least recently used closed first)."""

SHARD_SCHEMA = pa.schema(
    [
        pa.field("client", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
    ]
)


def block_file(block: int) -> str:
    """File name of block `block` in the shard folder."""
    return f"block_{block:05d}.arrow"


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
class EncodedBlock:
    """One block's examples as flat int32 arrays: example i is `input_ids[offsets[i]:
    offsets[i+1]]` (and the same slice of `labels`)."""

    offsets: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray

    def no_answer(self) -> int:
        """Examples whose labels are all IGNORE_INDEX (their response was cut off)."""
        lengths = np.diff(self.offsets)
        owner = np.repeat(np.arange(len(lengths)), lengths)
        kept = np.bincount(owner, weights=self.labels != IGNORE_INDEX, minlength=len(lengths))
        return int(np.count_nonzero(kept == 0))


def encode_records(
    table: pa.Table,
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool,
    chunk_rows: int = 1024,
) -> EncodedBlock:
    """`tokenize_records` of `table` as flat int32 arrays, `chunk_rows` records at a time, so
    only one chunk's Python lists are alive at once (a Python int costs ~40 bytes a token, an
    int32 4)."""
    lengths: list[np.ndarray] = []
    ids_parts: list[np.ndarray] = []
    label_parts: list[np.ndarray] = []
    for start in range(0, table.num_rows, chunk_rows):
        ids, labs = tokenize_records(
            table.slice(start, chunk_rows), tokenizer, template, cutoff_len, train_on_inputs
        )
        n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(n.sum())
        lengths.append(n)
        ids_parts.append(np.fromiter(itertools.chain.from_iterable(ids), np.int32, total))
        label_parts.append(np.fromiter(itertools.chain.from_iterable(labs), np.int32, total))
    offsets = np.zeros(table.num_rows + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    empty = np.empty(0, dtype=np.int32)
    return EncodedBlock(
        offsets,
        np.concatenate(ids_parts) if ids_parts else empty,
        np.concatenate(label_parts) if label_parts else empty,
    )


def choose_block_size(sizes: Sequence[int] | np.ndarray, target: int = BLOCK_RECORDS) -> int:
    """Clients per block so that a block holds ~`target` records on average (at least one
    client, at most all of them)."""
    n = len(sizes)
    if n == 0:
        return 1
    mean = float(np.sum(sizes)) / n
    if mean <= 0:
        return n
    return int(min(n, max(1, round(target / mean))))


@dataclass(frozen=True)
class ShardIndex:
    """Where each client's rows lie: rows offsets[c] .. offsets[c+1]-1 counted over all blocks
    in client order; client c lives in block c // block_size."""

    num_clients: int
    offsets: np.ndarray
    block_size: int

    @classmethod
    def from_sizes(
        cls, sizes: Sequence[int] | np.ndarray, block_size: int | None = None
    ) -> "ShardIndex":
        """The index of clients holding `sizes` records (block size chosen when not given)."""
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(np.asarray(sizes, dtype=np.int64), out=offsets[1:])
        return cls(len(sizes), offsets, block_size or choose_block_size(sizes))

    @property
    def num_blocks(self) -> int:
        return -(-self.num_clients // self.block_size)

    def block_of(self, client_id: int) -> int:
        """The block holding `client_id`."""
        if not 0 <= client_id < self.num_clients:
            raise IndexError(f"client {client_id} out of range for {self.num_clients} clients")
        return client_id // self.block_size

    def block_clients(self, block: int) -> range:
        """The client ids of `block`."""
        first = block * self.block_size
        return range(first, min(first + self.block_size, self.num_clients))

    def block_rows(self, block: int) -> tuple[int, int]:
        """(first row, end row) of `block`, counted over all blocks."""
        clients = self.block_clients(block)
        return int(self.offsets[clients.start]), int(self.offsets[clients.stop])

    def to_json(self) -> str:
        return json.dumps(
            {
                "num_clients": self.num_clients,
                "block_size": self.block_size,
                "offsets": self.offsets.tolist(),
            }
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> "ShardIndex":
        try:
            data = json.loads(text)
            num_clients, block_size = int(data["num_clients"]), int(data["block_size"])
            offsets = np.asarray([int(o) for o in data["offsets"]], dtype=np.int64)
        except (ValueError, KeyError, TypeError) as e:
            raise FedsimInputError(f"{where}: not a valid shard index ({e})") from None
        if len(offsets) != num_clients + 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise FedsimInputError(
                f"{where}: offsets must rise from 0, one per client plus the end"
            )
        if block_size < 1:
            raise FedsimInputError(f"{where}: block_size must be >= 1, got {block_size}")
        return cls(num_clients, offsets, block_size)


def write_index(path: Path, index: ShardIndex) -> None:
    """Write `index.json` into folder `path` atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rundir.write_text_atomic(path / INDEX_FILE, index.to_json())


def remove_blocks(path: Path) -> None:
    """Delete every block file (and leftover temporary) in folder `path`."""
    for f in Path(path).glob("block_*.arrow*"):
        f.unlink(missing_ok=True)


def block_table(index: ShardIndex, block: int, encoded: EncodedBlock) -> pa.Table:
    """The Arrow table of `block` from its clients' examples, in client order."""
    start, end = index.block_rows(block)
    if len(encoded.offsets) - 1 != end - start:
        raise ValueError(
            f"block {block}: {len(encoded.offsets) - 1} examples, expected {end - start}"
        )
    if encoded.offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"block {block}: more than 2**31 tokens")
    clients = index.block_clients(block)
    owner = np.repeat(
        np.arange(clients.start, clients.stop, dtype=np.int32),
        np.diff(index.offsets[clients.start : clients.stop + 1]),
    )
    offsets = pa.array(encoded.offsets.astype(np.int32))
    return pa.table(
        {
            "client": pa.array(owner),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(encoded.input_ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(encoded.labels)),
        },
        schema=SHARD_SCHEMA,
    )


def write_block(path: Path, block: int, table: pa.Table) -> Path:
    """Write `block`'s table into folder `path` under a temporary name, then rename it: a block
    file that exists is complete."""
    target = Path(path) / block_file(block)
    tmp = target.with_name(target.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SHARD_SCHEMA) as writer:
        writer.write_table(table)
    with open(tmp, "rb") as f:  # durable before it is visible under its final name
        os.fsync(f.fileno())
    os.replace(tmp, target)
    rundir.fsync_dir(target.parent)
    return target


def write_shards(
    path: Path,
    client_positions: list[np.ndarray],
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    block_size: int | None = None,
) -> ShardIndex:
    """Write every block at once from already tokenised records: the clients' examples
    (positions into `input_ids`/`labels`) under folder `path`. Old blocks are removed first.
    The driver builds blocks lazily instead (`fedsim.data.shard_builder`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_blocks(path)
    index = ShardIndex.from_sizes([len(p) for p in client_positions], block_size)
    write_index(path, index)
    for block in range(index.num_blocks):
        clients = index.block_clients(block)
        rows = [int(i) for c in clients for i in client_positions[c]]
        lengths = np.fromiter((len(input_ids[i]) for i in rows), dtype=np.int64, count=len(rows))
        if any(len(labels[i]) != n for i, n in zip(rows, lengths, strict=True)):
            raise ValueError("input_ids and labels differ in length for some record")
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        encoded = EncodedBlock(offsets, _flat(input_ids, rows), _flat(labels, rows))
        write_block(path, block, block_table(index, block, encoded))
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


def _flat(column: Sequence[Sequence[int]], rows: list[int]) -> np.ndarray:
    # Rows may be lists or int32 arrays (tokenize_records_compact); both concatenate.
    pieces = [np.asarray(column[i], dtype=np.int32) for i in rows]
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32)


def pack_block(path: Path, block: int) -> np.ndarray:
    """The bytes of `block`'s file in shard folder `path` as uint8, for `ray.put`: workers on any
    node open it with `ShardStore.add_block`."""
    file = Path(path) / block_file(block)
    try:
        return np.fromfile(file, dtype=np.uint8)
    except OSError as e:
        raise FedsimInputError(f"{file}: cannot read shard file ({e})") from None


class ShardStore:
    """Read side of the shard store, opened by each worker on the folder the driver writes.

    Blocks are opened on first use and the `open_blocks` most recently used kept open. Opened
    on a folder, a block is memory-mapped from its file; opened with `from_index`, blocks are
    handed in as buffers with `add_block` (the object-store transport).
    """

    def __init__(self, path: Path, open_blocks: int = OPEN_BLOCKS) -> None:
        path = Path(path)
        index_path = path / INDEX_FILE
        if not index_path.is_file():
            raise FedsimInputError(f"{index_path}: shard index missing (shards not written yet?)")
        self._init(index_path.read_text(encoding="utf-8"), path, path, open_blocks)

    @classmethod
    def from_index(
        cls, index_json: str, where: str, open_blocks: int = OPEN_BLOCKS
    ) -> "ShardStore":
        """A store from the content of `index.json` whose blocks come as buffers (`add_block`);
        `where` names their origin in error messages."""
        store = cls.__new__(cls)
        store._init(index_json, Path(where), None, open_blocks)
        return store

    def _init(self, index_text: str, where: Path, folder: Path | None, open_blocks: int) -> None:
        self.index = ShardIndex.from_json(index_text, str(where / INDEX_FILE))
        self._where, self._folder = where, folder
        self._open_blocks = max(1, open_blocks)
        self._blocks: OrderedDict[int, pa.Table] = OrderedDict()

    @property
    def num_clients(self) -> int:
        return self.index.num_clients

    def block_of(self, client_id: int) -> int:
        """The block holding `client_id`."""
        return self.index.block_of(client_id)

    def has_block(self, block: int) -> bool:
        """Whether `block` is open now."""
        return block in self._blocks

    def add_block(self, block: int, data: Any) -> None:
        """Open `block` from its file's bytes held in memory (any object with the buffer
        protocol, e.g. a numpy array fetched from Ray's object store, read without a copy)."""
        self._cache(block, pa.BufferReader(pa.py_buffer(data)))

    def num_records(self, client_id: int) -> int:
        """Number of examples held by `client_id`."""
        start, end = self._range(client_id)
        return end - start

    def client_examples(self, client_id: int) -> ClientExamples:
        """The examples of `client_id`, in the order they were written."""
        start, end = self._range(client_id)
        block = self.index.block_of(client_id)
        first, _ = self.index.block_rows(block)
        rows = self._block(block).slice(start - first, end - start)
        ids = _one_chunk(rows.column("input_ids"))
        labels = _one_chunk(rows.column("labels"))
        # Written with shared offsets; sliced offsets are absolute into the unsliced values.
        offsets = ids.offsets.to_numpy()
        return ClientExamples(
            offsets=offsets,
            input_ids=ids.values.to_numpy(zero_copy_only=True),
            labels=labels.values.to_numpy(zero_copy_only=True),
        )

    def _block(self, block: int) -> pa.Table:
        table = self._blocks.get(block)
        if table is not None:
            self._blocks.move_to_end(block)
            return table
        file = self._where / block_file(block)
        if self._folder is None:
            raise FedsimInputError(f"{file}: block not handed to this worker")
        try:
            source = pa.memory_map(str(file))
        except (pa.ArrowException, OSError) as e:
            raise FedsimInputError(f"{file}: cannot read shard file ({e})") from None
        return self._cache(block, source)

    def _cache(self, block: int, source: Any) -> pa.Table:
        file = self._where / block_file(block)
        try:
            table = pa.ipc.open_file(source).read_all()
        except (pa.ArrowException, OSError) as e:
            raise FedsimInputError(f"{file}: cannot read shard file ({e})") from None
        start, end = self.index.block_rows(block)
        if table.schema != SHARD_SCHEMA or table.num_rows != end - start:
            raise FedsimInputError(
                f"{file}: does not match {INDEX_FILE} "
                f"({table.num_rows} rows, index says {end - start})"
            )
        # client_examples slices both columns with the input_ids offsets: they must agree.
        for ids, labels in zip(
            table.column("input_ids").chunks, table.column("labels").chunks, strict=True
        ):
            if not ids.offsets.equals(labels.offsets):
                raise FedsimInputError(f"{file}: input_ids and labels differ in shape")
        self._blocks[block] = table
        self._blocks.move_to_end(block)
        while len(self._blocks) > self._open_blocks:
            self._blocks.popitem(last=False)
        return table

    def _range(self, client_id: int) -> tuple[int, int]:
        if not 0 <= client_id < self.num_clients:
            raise IndexError(f"client {client_id} out of range for {self.num_clients} clients")
        return int(self.index.offsets[client_id]), int(self.index.offsets[client_id + 1])


def _one_chunk(column: pa.ChunkedArray) -> pa.ListArray:
    # A client range may span record batches; combining copies only in that case.
    if column.num_chunks == 1:
        return column.chunk(0)
    if column.num_chunks == 0:
        return pa.array([], SHARD_SCHEMA.field("input_ids").type)
    return column.combine_chunks()
