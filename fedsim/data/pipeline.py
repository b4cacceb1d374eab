"""From the `data` config to client shards: load records, hold out a test split, partition.

`prepare_data` does everything that can fail on bad input (missing file, malformed line, empty
client) and writes nothing, so the driver can call it before it touches the run directory.

What grows with the registered clients stays in arrays: the partition is a `ClientPositions`
(offsets and one flat array), categories are integer codes, and partition.json is written in
pieces (`partition_json`), never built as one Python object with an entry per client.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedsim import rundir
from fedsim.checkpoint import sha256_file
from fedsim.config import DataConfig
from fedsim.data.partitioners import (
    ClientPositions,
    SplitFile,
    category_counts,
    hold_out_per_client,
    hold_out_test,
    make_partitioner,
    positions_for,
)
from fedsim.data.records import SCHEMA, make_table
from fedsim.data.sources import FieldMap, load_records
from fedsim.data.synthetic import BUILTIN_VERSION, iter_instructions
from fedsim.errors import FedsimInputError
from fedsim.seeds import Stream, generator

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("quickstart",)
BUILTIN_DATA_SEED = 1234
"""The built-in data does not change with the run seed: runs with other seeds see the same data."""


@dataclass
class PreparedData:
    """All records, and which of them each client and the test split hold (row positions)."""

    table: pa.Table
    clients: ClientPositions
    """Each client's training records (its held-out slice removed)."""
    test: np.ndarray
    fingerprint: str
    client_test: ClientPositions = field(default_factory=ClientPositions.empty)
    """Each client's held-out slice (`data.test_per_client`); no clients when there is none."""
    client_test_fraction: float = 0.0
    _codes: tuple[np.ndarray, list[str]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A list of per-client arrays (a caller of the older API) becomes flat arrays.
        if not isinstance(self.clients, ClientPositions):
            self.clients = ClientPositions.from_parts(self.clients)
        if not isinstance(self.client_test, ClientPositions):
            self.client_test = ClientPositions.from_parts(self.client_test)

    def categories(self) -> np.ndarray:
        """Each record's category as a Python string (one object per record: for small data and
        tests; the pipeline itself uses `category_codes`)."""
        return self.table.column("category").to_numpy(zero_copy_only=False)

    def category_codes(self) -> tuple[np.ndarray, list[str]]:
        """(each record's category code, the category names in sorted order), cached."""
        if self._codes is None:
            self._codes = category_codes(self.table)
        return self._codes

    def partition_hash(self) -> str:
        digest = hashlib.sha256(self.fingerprint.encode())
        _hash_parts(digest, self.clients)
        _hash_parts(digest, ClientPositions.single(self.test))
        if len(self.client_test):  # only then: runs without slices keep their hashes
            digest.update(b"client_test|")
            _hash_parts(digest, self.client_test)
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        """The content of partition.json, as one dict (`partition_json` writes it in pieces)."""
        return json.loads("".join(self.partition_json()))

    def partition_json(self) -> Iterator[str]:
        """partition.json's text in pieces: exactly `json.dumps(summary, indent=1)`, one block of
        clients at a time, so that no step holds a Python object per client."""
        codes, names = self.category_codes()
        test = ClientPositions.single(self.test)
        items: list[tuple[str, str | Iterable[str]]] = [
            ("data_fingerprint", json.dumps(self.fingerprint)),
            ("partition_hash", json.dumps(self.partition_hash())),
            ("num_records", str(self.table.num_rows)),
            ("num_clients", str(len(self.clients))),
            ("test", _client_text(test, codes, names, self._source_index(self.test), 1)),
            ("clients", _clients_text(self.clients, codes, names, None, 1)),
        ]
        if len(self.client_test):
            held = self.client_test
            slices = [
                ("fraction", json.dumps(self.client_test_fraction)),
                ("records", str(len(held.flat))),
                ("clients", _clients_text(held, codes, names, self._source_index(held.flat), 2)),
            ]
            items.append(("test_per_client", _object_text(slices, 1)))
        yield from _object_text(items, 0)

    def _source_index(self, positions: np.ndarray) -> np.ndarray:
        """The source indices of the records at `positions`."""
        column = self.table.column("source_index")
        return column.take(pa.array(positions, type=pa.int64())).to_numpy()


def category_codes(table: pa.Table) -> tuple[np.ndarray, list[str]]:
    """(each record's category as an int32 code, the names in sorted order): code i is the i-th
    name, so codes sort as the names do and the partitioners split codes as they split names,
    without a Python string per record."""
    column = table.column("category")
    names = sorted(pc.unique(column).to_pylist())
    codes = pc.index_in(column, value_set=pa.array(names, type=pa.string()))
    return np.asarray(codes.to_numpy(), dtype=np.int32), names


# --- partition.json, in pieces -----------------------------------------------------------------

CLIENT_BLOCK = 1 << 12
"""Clients whose partition.json entries are formatted together (one bincount, one string)."""


def _object_text(items: Sequence[tuple[str, str | Iterable[str]]], level: int) -> Iterator[str]:
    """`json.dumps(obj, indent=1)` of an object at nesting `level` whose values are already JSON
    text (a string, or pieces of one)."""
    if not items:
        yield "{}"
        return
    inner = "\n" + " " * (level + 1)
    for i, (key, value) in enumerate(items):
        yield ("{" if i == 0 else ",") + inner + json.dumps(key) + ": "
        if isinstance(value, str):
            yield value
        else:
            yield from value
    yield "\n" + " " * level + "}"


def _clients_text(
    parts: ClientPositions,
    codes: np.ndarray,
    names: list[str],
    source_index: np.ndarray | None,
    level: int,
) -> Iterator[str]:
    """The object {"<client>": {"records", "categories"[, "source_index"]}} at `level`, built
    block by block: a block's histograms are one bincount, its text one join."""
    if not len(parts):
        yield "{}"
        return
    # Each nonzero count of a block is one item "name": count of some client's histogram.
    item_prefix = [f"\n{' ' * (level + 3)}{json.dumps(name)}: " for name in names]
    head = "\n" + " " * (level + 1)
    fields = "\n" + " " * (level + 2)
    close_hist = "\n" + " " * (level + 2) + "}"
    close_client = "\n" + " " * (level + 1) + "}"
    block = max(1, min(CLIENT_BLOCK, (1 << 20) // max(1, len(names))))
    for start in range(0, len(parts), block):
        stop = min(start + block, len(parts))
        counts = category_counts(codes, parts, len(names), start, stop)
        rows, cols = np.nonzero(counts)
        items = [
            item_prefix[c] + str(n)
            for c, n in zip(cols.tolist(), counts[rows, cols].tolist(), strict=True)
        ]
        bounds = np.searchsorted(rows, np.arange(stop - start + 1)).tolist()
        sizes = parts.sizes()[start:stop].tolist()
        if source_index is not None:
            lo, hi = parts.offsets[start], parts.offsets[stop]
            lines = source_index[lo:hi].tolist()
            line_bounds = (parts.offsets[start : stop + 1] - lo).tolist()
        pieces = []
        for i in range(stop - start):
            text = (
                f'{"{" if start + i == 0 else ","}{head}"{start + i}": {{{fields}"records": '
                f'{sizes[i]},{fields}"categories": '
            )
            hist = items[bounds[i] : bounds[i + 1]]
            text += "{" + ",".join(hist) + close_hist if hist else "{}"
            if source_index is not None:
                own = lines[line_bounds[i] : line_bounds[i + 1]]
                text += f',{fields}"source_index": ' + _list_text(own, level + 2)
            pieces.append(text + close_client)
        yield "".join(pieces)
    yield "\n" + " " * level + "}"


def _client_text(
    part: ClientPositions,
    codes: np.ndarray,
    names: list[str],
    source_index: np.ndarray,
    level: int,
) -> Iterator[str]:
    """The test split's object {"records", "categories", "source_index"} at `level`."""
    (counts,) = category_counts(codes, part, len(names))
    histogram = [(name, str(n)) for name, n in zip(names, counts.tolist(), strict=True) if n]
    items = [
        ("records", str(len(part.flat))),
        ("categories", "".join(_object_text(histogram, level + 1))),
        ("source_index", _list_text(source_index.tolist(), level + 1)),
    ]
    yield from _object_text(items, level)


def _list_text(values: list[int], level: int) -> str:
    """`json.dumps(values, indent=1)` of a list of ints at nesting `level`."""
    if not values:
        return "[]"
    inner = "\n" + " " * (level + 1)
    return "[" + inner + ("," + inner).join(map(str, values)) + "\n" + " " * level + "]"


def _hash_parts(digest: Any, parts: ClientPositions, max_records: int = 1 << 20) -> None:
    """Feed each part's int64 bytes and a b"|" to `digest`, as a loop over the parts would, in
    blocks of about `max_records` records instead of one update per client."""
    n, offsets = len(parts), parts.offsets
    start = 0
    while start < n:
        stop = int(np.searchsorted(offsets, offsets[start] + max_records, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        lo = offsets[start]
        body = parts.flat[lo : offsets[stop]].view(np.uint8)
        # Byte position of each separator: after the part's bytes and the separators before it.
        seps = 8 * (offsets[start + 1 : stop + 1] - lo) + np.arange(stop - start)
        out = np.empty(len(body) + stop - start, dtype=np.uint8)
        keep = np.ones(len(out), dtype=bool)
        keep[seps] = False
        out[seps] = ord("|")
        out[keep] = body
        digest.update(out)
        start = stop


def builtin_fingerprint(source: str, num_records: int, version: int = BUILTIN_VERSION) -> str:
    """The fingerprint of generated data. Version 2 was the first to be versioned and wrote no
    version into it; later versions do, so that their runs and version 2's tell each other apart
    (and runs of version 2 stay resumable)."""
    fingerprint = f"{source}:{num_records}:{BUILTIN_DATA_SEED}"
    return fingerprint if version <= 2 else f"{fingerprint}:v{version}"


GENERATED_BATCH = 1 << 13
"""Generated records go to Arrow this many at a time (a 1,000,000-record source never exists as
Python dicts all at once)."""


def builtin_table(num_records: int) -> pa.Table:
    """The built-in generated records as one Arrow table (chunked by `GENERATED_BATCH` rows)."""
    chunks = list(_builtin_batches(num_records))
    return pa.concat_tables(chunks) if chunks else make_table([])


def _builtin_batches(num_records: int) -> Iterator[pa.Table]:
    records = iter_instructions(num_records, seed=BUILTIN_DATA_SEED)
    for start in range(0, num_records, GENERATED_BATCH):
        batch = list(itertools.islice(records, GENERATED_BATCH))
        for offset, record in enumerate(batch):
            record["source_index"] = start + offset
        yield make_table(batch)


MAPPED_RECORDS = 100_000
"""From this many generated records on, the table is kept as an Arrow file in the cache and
memory-mapped: generating it again costs seconds per million records, and a mapped table
brings into memory only the pages read (the categories; a round's clients' text)."""


def data_cache_dir() -> Path:
    """``$FEDSIM_CACHE_DIR/data`` (default ``~/.cache/fedsim/data``), as the tiny model's cache
    resolves it; read here so that loading data imports no model code."""
    env = os.environ.get("FEDSIM_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "fedsim"
    return root / "data"


def mapped_builtin_table(num_records: int) -> pa.Table:
    """`builtin_table(num_records)`, memory-mapped from the cache's Arrow file. A missing or
    unreadable file is written first, by a child process (`write_builtin_file`), so that the
    generation's garbage never lands in this process; where that fails, the table is built here
    in memory."""
    name = f"quickstart-{num_records}-{BUILTIN_DATA_SEED}-v{BUILTIN_VERSION}.arrow"
    path = data_cache_dir() / name
    table = _read_mapped(path, num_records)
    if table is not None:
        return table
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the fedsim package
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    code = "import sys; from fedsim.data.pipeline import write_builtin_file as w; w(*sys.argv[1:])"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-c", code, str(num_records), str(path)],
            env=env,
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    table = _read_mapped(path, num_records)
    return table if table is not None else builtin_table(num_records)


def write_builtin_file(num_records: int | str, path: str | Path) -> None:
    """Write `builtin_table(num_records)` to Arrow file `path` (atomically) as one record batch:
    `take` on a table of many chunks makes Arrow concatenate every chunk first (the whole text,
    to tokenise a few clients), on one chunk it reads only the rows taken."""
    num_records, path = int(num_records), Path(path)
    pieces: list[list[pa.Array]] = [[] for _ in SCHEMA]
    for chunk in _builtin_batches(num_records):
        for i, column in enumerate(chunk.columns):
            pieces[i].extend(column.chunks)
    arrays = []
    for i, field_ in enumerate(SCHEMA):
        arrays.append(pa.concat_arrays(pieces[i]) if pieces[i] else pa.array([], field_.type))
        pieces[i] = []  # a column's pieces go as soon as it is whole
    batch = pa.record_batch(arrays, schema=SCHEMA)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_batch(batch)
        os.replace(tmp, path)  # concurrent writers each replace it with the same records
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def _read_mapped(path: Path, num_records: int) -> pa.Table | None:
    """The table in Arrow file `path` (memory-mapped), or None when it is missing, unreadable
    or not `num_records` records of the record schema."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (OSError, pa.ArrowInvalid):
        return None
    if table.num_rows != num_records or not table.schema.equals(SCHEMA):
        return None
    return table


def load_source(cfg: DataConfig) -> tuple[pa.Table, str]:
    """The record table named by `data.source`, and a fingerprint of its content."""
    if cfg.source.startswith(BUILTIN_PREFIX):
        name = cfg.source.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_DATASETS:
            raise FedsimInputError(
                f"data.source: unknown built-in dataset {name!r}; expected builtin:quickstart"
            )
        n = cfg.builtin_records
        table = mapped_builtin_table(n) if n >= MAPPED_RECORDS else builtin_table(n)
        return table, builtin_fingerprint(cfg.source, n)
    fields = FieldMap(**vars(cfg.fields))
    table = load_records(cfg.source, fields, cfg.format)
    path = Path(cfg.source).expanduser()
    fingerprint = f"sha256:{sha256_file(path)}" if path.is_file() else f"hub:{cfg.source}"
    return table, fingerprint


def load_table(cfg: DataConfig) -> tuple[pa.Table, str]:
    """The records a run uses (`data.source`, cut to `data.max_records`) and their fingerprint,
    as recorded in partition.json."""
    table, fingerprint = load_source(cfg)
    if cfg.max_records is not None and cfg.max_records < table.num_rows:
        table = table.slice(0, cfg.max_records)
        fingerprint += f":first{cfg.max_records}"
    return table, fingerprint


def prepare_data(cfg: DataConfig, seed: int) -> PreparedData:
    """Load, hold out, partition and hold out each client's slice; raises FedsimInputError on
    any bad input."""
    data = _partition(cfg, seed)
    if not cfg.test_per_client:
        return data
    rngs = _ClientGenerators(seed, Stream.CLIENT_TEST, len(data.clients))
    train, held = hold_out_per_client(data.clients, cfg.test_per_client, rngs)
    return PreparedData(
        data.table, train, data.test, data.fingerprint, held, cfg.test_per_client, data._codes
    )


class _ClientGenerators(Sequence[np.random.Generator]):
    """Client c's generator of `stream`, built when asked for (not one object per client)."""

    def __init__(self, seed: int, stream: Stream, num_clients: int) -> None:
        self.seed, self.stream, self.num_clients = seed, stream, num_clients

    def __len__(self) -> int:
        return self.num_clients

    def __getitem__(self, client: int) -> np.random.Generator:  # type: ignore[override]
        if not 0 <= client < self.num_clients:
            raise IndexError(client)
        return generator(self.seed, self.stream, client)


def _partition(cfg: DataConfig, seed: int) -> PreparedData:
    """Load, hold out the test split and partition the rest among the clients."""
    table, fingerprint = load_table(cfg)
    p = cfg.partition

    if p.kind == "split_file":
        assert p.path is not None
        client_src, test_src = SplitFile(p.path).load()
        if len(client_src) != cfg.num_clients:
            raise FedsimInputError(
                f"data.num_clients: {cfg.num_clients}, but {p.path} lists {len(client_src)} clients"
            )
        source_index = table.column("source_index").to_numpy()
        clients = [positions_for(source_index, src, p.path) for src in client_src]
        test = positions_for(source_index, test_src, p.path)
        return PreparedData(table, ClientPositions.from_parts(clients), test, fingerprint)

    codes, names = category_codes(table)
    rng = generator(seed, Stream.PARTITION)
    if cfg.test_per_category:
        train, test = hold_out_test(codes, cfg.test_per_category, rng, names)
    else:
        train, test = np.arange(table.num_rows), np.array([], dtype=np.int64)
    partitioner = make_partitioner(
        p.kind,
        alpha=p.alpha,
        min_size=p.min_size,
        shards_per_client=p.shards_per_client,
        path=p.path,
    )
    parts = partitioner.split(codes[train], cfg.num_clients, rng)
    clients = parts.map(train) if len(test) else parts  # without a test split, train is 0..n-1
    return PreparedData(table, clients, test, fingerprint, _codes=(codes, names))


def format_partition_table(summary: dict[str, Any]) -> str:
    """Per-client records and category mix, as printed by `fedsim partition`."""
    cats = sorted({c for client in summary["clients"].values() for c in client["categories"]})
    lines = [
        f"{summary['num_clients']} clients, {summary['num_records']} records, "
        f"{summary['test']['records']} held out for test"
        + (
            f", {summary['test_per_client']['records']} in the clients' own test slices"
            if "test_per_client" in summary
            else ""
        ),
        f"{'client':>6} {'records':>7}  category mix",
    ]
    for cid, client in summary["clients"].items():
        total = client["records"]
        mix = ", ".join(
            f"{c} {100 * n / total:.0f}%"
            for c, n in sorted(client["categories"].items(), key=lambda kv: -kv[1])
        )
        lines.append(f"{cid:>6} {total:>7}  {mix}")
    lines.append(f"categories: {', '.join(cats)}")
    return "\n".join(lines)


def write_partition(path: Path, data: PreparedData) -> None:
    """Replace `path` with `data`'s partition.json, written in pieces, atomically."""
    rundir.write_chunks_atomic(path, (piece.encode("utf-8") for piece in data.partition_json()))
