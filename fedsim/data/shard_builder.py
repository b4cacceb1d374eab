"""Driver side of the shard store: tokenise a block when a round needs it, the next round's
blocks in the background while this round trains.

`materialise` writes `index.json` (from the partition sizes, without tokenising); a
`ShardBuilder` then owns the tokenizer, the template, the record table and the partition and
builds block files on demand. Builds run on one background thread (the Rust tokenizer releases
the GIL for the batch encode), so `prefetch` overlaps training and `ensure` waits for a block that
is already being built instead of building it twice. A block file that exists (from an earlier
run with the same shards key, or a resumed run) is reused, never re-tokenised.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fedsim.data.shards import (
    INDEX_FILE,
    ShardIndex,
    block_file,
    block_table,
    encode_records,
    pack_block,
    write_block,
)
from fedsim.data.templates import PromptTemplate


class ShardBuilder:
    """Builds the block files of shard folder `folder` (whose `index.json` exists) on demand.

    `table` holds every record, `clients[c]` the row positions of client c in it (the partition);
    records are tokenised as in `fedsim.data.shards.tokenize_records`.
    """

    def __init__(
        self,
        folder: Path,
        table: pa.Table,
        clients: list[np.ndarray],
        tokenizer: Any,
        template: PromptTemplate,
        cutoff_len: int,
        train_on_inputs: bool,
        log: Callable[[str], None] = print,
    ) -> None:
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        self.index = ShardIndex.from_json(index_path.read_text(encoding="utf-8"), str(index_path))
        if self.index.num_clients != len(clients):
            raise ValueError(
                f"{index_path}: {self.index.num_clients} clients, the partition has {len(clients)}"
            )
        self._table, self._clients, self._tokenizer = table, clients, tokenizer
        self._template, self._cutoff_len, self._train_on_inputs = (
            template,
            cutoff_len,
            train_on_inputs,
        )
        self._log = log
        self._lock = threading.Lock()
        self._in_flight: dict[int, Future[None]] = {}
        # One thread: builds never run concurrently (a tokenizer is not safe to share between
        # threads), and the driver's main thread only waits.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsim-shards")
        self._refs: dict[int, Any] = {}
        self.built: list[int] = []
        """Blocks this builder tokenised, in build order."""
        self.build_seconds = 0.0
        """Time spent building them (on the background thread)."""

    def __enter__(self) -> ShardBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop: drop queued builds, wait for the one running (its file is then complete)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def blocks_for(self, client_ids: Iterable[int]) -> list[int]:
        """The blocks holding `client_ids`, ascending."""
        return sorted({self.index.block_of(int(c)) for c in client_ids})

    def block_path(self, block: int) -> Path:
        return self.folder / block_file(block)

    def ensure(self, client_ids: Iterable[int]) -> None:
        """Return once the blocks of `client_ids` are on disk: built now, or waited for when a
        prefetch is building them; a build's error is raised here."""
        for future in self._submit(self.blocks_for(client_ids)):
            future.result()

    def prefetch(self, client_ids: Iterable[int]) -> None:
        """Start building the missing blocks of `client_ids` in the background and return; a
        failure surfaces at the `ensure` that needs the block (which builds it again)."""
        self._submit(self.blocks_for(client_ids))

    def object_ref(self, client_id: int) -> Any:
        """ObjectRef of the bytes of the (built) block holding `client_id`, for the
        object-store transport: a block is put once and its reference kept (a few bytes per
        block; the bytes themselves live in the object store) until `keep_refs` drops it."""
        import ray

        block = self.index.block_of(client_id)
        ref = self._refs.get(block)
        if ref is None:
            ref = self._refs[block] = ray.put(pack_block(self.folder, block))
        return ref

    def keep_refs(self, client_ids: Iterable[int]) -> None:
        """Drop the references of blocks other than those of `client_ids`, so the object store
        frees them: the pages a put writes count in the driver's RSS until the object is freed
        and its memory reused, so holding every block would grow the driver with the data. A
        dropped block is put again from its file (milliseconds) when a later round needs it."""
        keep = set(self.blocks_for(client_ids))
        for block in [b for b in self._refs if b not in keep]:
            del self._refs[block]

    def _submit(self, blocks: list[int]) -> list[Future[None]]:
        futures = []
        with self._lock:
            for block in blocks:
                if self.block_path(block).exists():
                    continue
                future = self._in_flight.get(block)
                if future is None:
                    future = self._executor.submit(self._build, block)
                    self._in_flight[block] = future
                futures.append(future)
        return futures

    def _build(self, block: int) -> None:
        try:
            start = time.perf_counter()
            clients = self.index.block_clients(block)
            positions = [self._clients[c] for c in clients]
            rows = np.concatenate(positions) if positions else np.empty(0, dtype=np.int64)
            records = self._table.take(pa.array(rows, type=pa.int64()))
            encoded = encode_records(
                records, self._tokenizer, self._template, self._cutoff_len, self._train_on_inputs
            )
            no_answer = encoded.no_answer()
            if no_answer:
                self._log(
                    f"warning: shard block {block}: {no_answer} of {len(rows)} records lose their "
                    f"whole response to data.cutoff_len={self._cutoff_len}; they add nothing to "
                    "training"
                )
            write_block(self.folder, block, block_table(self.index, block, encoded))
            self.built.append(block)
            self.build_seconds += time.perf_counter() - start
        finally:
            # The file exists now (or the build failed and the next ensure tries again).
            with self._lock:
                self._in_flight.pop(block, None)
