"""From the `data` config to client shards: load records, hold out a test split, partition.

`prepare_data` does everything that can fail on bad input (missing file, malformed line, empty
client) and writes nothing, so the driver can call it before it touches the run directory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fedsim import rundir
from fedsim.checkpoint import sha256_file
from fedsim.config import DataConfig
from fedsim.data.partitioners import (
    SplitFile,
    category_histogram,
    hold_out_per_client,
    hold_out_test,
    make_partitioner,
    positions_for,
)
from fedsim.data.records import make_table
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
    clients: list[np.ndarray]
    """Each client's training records (its held-out slice removed)."""
    test: np.ndarray
    fingerprint: str
    client_test: list[np.ndarray] = field(default_factory=list)
    """Each client's held-out slice (`data.test_per_client`); empty when there is none."""
    client_test_fraction: float = 0.0

    def categories(self) -> np.ndarray:
        return self.table.column("category").to_numpy(zero_copy_only=False)

    def partition_hash(self) -> str:
        digest = hashlib.sha256(self.fingerprint.encode())
        for part in [*self.clients, self.test]:
            digest.update(np.asarray(part, dtype=np.int64).tobytes())
            digest.update(b"|")
        if self.client_test:  # only then: runs without slices keep their hashes
            digest.update(b"client_test|")
            for part in self.client_test:
                digest.update(np.asarray(part, dtype=np.int64).tobytes())
                digest.update(b"|")
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        """The content of partition.json."""
        categories = self.categories()
        source_index = self.table.column("source_index").to_numpy()
        summary = {
            "data_fingerprint": self.fingerprint,
            "partition_hash": self.partition_hash(),
            "num_records": self.table.num_rows,
            "num_clients": len(self.clients),
            "test": {
                "records": len(self.test),
                "categories": category_histogram(categories, self.test),
                "source_index": source_index[self.test].tolist(),
            },
            "clients": {
                str(cid): {"records": len(pos), "categories": category_histogram(categories, pos)}
                for cid, pos in enumerate(self.clients)
            },
        }
        if self.client_test:
            summary["test_per_client"] = {
                "fraction": self.client_test_fraction,
                "records": sum(len(pos) for pos in self.client_test),
                "clients": {
                    str(cid): {
                        "records": len(pos),
                        "categories": category_histogram(categories, pos),
                        "source_index": source_index[pos].tolist(),
                    }
                    for cid, pos in enumerate(self.client_test)
                },
            }
        return summary


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
    records = iter_instructions(num_records, seed=BUILTIN_DATA_SEED)
    chunks = []
    for start in range(0, num_records, GENERATED_BATCH):
        batch = list(itertools.islice(records, GENERATED_BATCH))
        for offset, record in enumerate(batch):
            record["source_index"] = start + offset
        chunks.append(make_table(batch))
    return pa.concat_tables(chunks) if chunks else make_table([])


def load_source(cfg: DataConfig) -> tuple[pa.Table, str]:
    """The record table named by `data.source`, and a fingerprint of its content."""
    if cfg.source.startswith(BUILTIN_PREFIX):
        name = cfg.source.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_DATASETS:
            raise FedsimInputError(
                f"data.source: unknown built-in dataset {name!r}; expected builtin:quickstart"
            )
        table = builtin_table(cfg.builtin_records)
        return table, builtin_fingerprint(cfg.source, cfg.builtin_records)
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
    rngs = [generator(seed, Stream.CLIENT_TEST, c) for c in range(len(data.clients))]
    train, held = hold_out_per_client(data.clients, cfg.test_per_client, rngs)
    return PreparedData(data.table, train, data.test, data.fingerprint, held, cfg.test_per_client)


def _partition(cfg: DataConfig, seed: int) -> PreparedData:
    """Load, hold out the test split and partition the rest among the clients."""
    table, fingerprint = load_table(cfg)
    categories = table.column("category").to_numpy(zero_copy_only=False)
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
        return PreparedData(table, clients, test, fingerprint)

    rng = generator(seed, Stream.PARTITION)
    if cfg.test_per_category:
        train, test = hold_out_test(categories, cfg.test_per_category, rng)
    else:
        train, test = np.arange(table.num_rows), np.array([], dtype=np.int64)
    partitioner = make_partitioner(
        p.kind,
        alpha=p.alpha,
        min_size=p.min_size,
        shards_per_client=p.shards_per_client,
        path=p.path,
    )
    parts = partitioner.split(categories[train], cfg.num_clients, rng)
    return PreparedData(table, [train[part] for part in parts], test, fingerprint)


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


def write_partition(path: Path, summary: dict[str, Any]) -> None:
    rundir.write_text_atomic(path, json.dumps(summary, indent=1))
