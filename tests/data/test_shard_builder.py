"""The driver's shard builder: blocks tokenised lazily, the next round's in the background."""

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from transformers import PreTrainedTokenizerFast

from fedsim.data.partitioners import IID
from fedsim.data.records import make_table
from fedsim.data.shard_builder import ShardBuilder
from fedsim.data.shards import (
    ShardIndex,
    ShardStore,
    block_file,
    tokenize_records,
    write_index,
)
from fedsim.data.synthetic import generate_instructions
from fedsim.data.templates import get_template
from fedsim.errors import FedsimInputError

ALPACA = get_template("alpaca")
CLIENTS = 8
BLOCK_SIZE = 2  # blocks {0,1} {2,3} {4,5} {6,7}


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return make_table(generate_instructions(64, seed=1))


@pytest.fixture(scope="module")
def clients(table: pa.Table) -> list[np.ndarray]:
    categories = table.column("category").to_numpy(zero_copy_only=False)
    return IID().split(categories, CLIENTS, np.random.default_rng(0))


def new_builder(
    folder: Path,
    table: pa.Table,
    clients: list[np.ndarray],
    tokenizer: Any,
    log: Any = print,
    cutoff_len: int = 512,
) -> ShardBuilder:
    if not (folder / "index.json").exists():
        write_index(folder, ShardIndex.from_sizes([len(c) for c in clients], BLOCK_SIZE))
    return ShardBuilder(folder, table, clients, tokenizer, ALPACA, cutoff_len, False, log)


def blocks_on_disk(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("block_*"))


class GatedTokenizer:
    """The real tokenizer, but each call waits until the test opens the gate, so a test can
    hold a build in flight."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self._tokenizer = tokenizer
        self.entered, self.gate = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return self._tokenizer(*args, **kwargs)


def test_ensure_builds_only_the_blocks_its_clients_need(
    tmp_path: Path, table: pa.Table, clients: list[np.ndarray], tokenizer: PreTrainedTokenizerFast
) -> None:
    with new_builder(tmp_path, table, clients, tokenizer) as builder:
        builder.ensure([3, 2, 6])

    assert blocks_on_disk(tmp_path) == [block_file(1), block_file(3)]
    assert builder.built == [1, 3]
    expected_ids, expected_labels = tokenize_records(table, tokenizer, ALPACA, 512, False)
    store = ShardStore(tmp_path)
    for client in (2, 3, 6):
        ids, labels = store.client_examples(client).to_lists()
        assert ids == [expected_ids[i] for i in clients[client]]
        assert labels == [expected_labels[i] for i in clients[client]]
    with pytest.raises(FedsimInputError, match=r"block_00000\.arrow: cannot read shard file"):
        store.client_examples(0)  # never needed, never built


def test_prefetch_builds_in_the_background_and_ensure_waits_instead_of_building_again(
    tmp_path: Path, table: pa.Table, clients: list[np.ndarray], tokenizer: PreTrainedTokenizerFast
) -> None:
    gated = GatedTokenizer(tokenizer)
    with new_builder(tmp_path, table, clients, gated) as builder:
        builder.prefetch([0])  # returns at once; the build waits at the gate
        assert gated.entered.wait(timeout=30)
        waiter = threading.Thread(target=builder.ensure, args=([1],))  # same block 0
        waiter.start()
        waiter.join(timeout=0.3)
        assert waiter.is_alive()  # waiting for the build in flight
        assert blocks_on_disk(tmp_path) == []

        gated.gate.set()
        waiter.join(timeout=30)

        assert not waiter.is_alive()
        assert blocks_on_disk(tmp_path) == [block_file(0)]
        assert builder.built == [0]  # built once


def test_existing_blocks_are_reused_not_tokenised_again(
    tmp_path: Path, table: pa.Table, clients: list[np.ndarray], tokenizer: PreTrainedTokenizerFast
) -> None:
    with new_builder(tmp_path, table, clients, tokenizer) as first:
        first.ensure([0, 2])
    written = (tmp_path / block_file(0)).stat().st_mtime_ns

    with new_builder(tmp_path, table, clients, tokenizer) as second:  # e.g. a resumed run
        second.ensure(range(CLIENTS))

    assert second.built == [2, 3]
    assert (tmp_path / block_file(0)).stat().st_mtime_ns == written
    assert blocks_on_disk(tmp_path) == [block_file(b) for b in range(4)]


def test_cut_off_responses_are_counted_per_built_block(
    tmp_path: Path, table: pa.Table, clients: list[np.ndarray], tokenizer: PreTrainedTokenizerFast
) -> None:
    lines: list[str] = []
    # 40 tokens: shorter than the Alpaca prompt, so every response is cut off
    with new_builder(tmp_path, table, clients, tokenizer, lines.append, cutoff_len=40) as b:
        b.ensure([5])

    records = len(clients[4]) + len(clients[5])
    assert lines == [
        f"warning: shard block 2: {records} of {records} records lose their whole response to "
        "data.cutoff_len=40; they add nothing to training"
    ]


def test_a_failed_build_is_raised_by_ensure_and_leaves_no_block(
    tmp_path: Path, table: pa.Table, clients: list[np.ndarray], tokenizer: PreTrainedTokenizerFast
) -> None:
    with new_builder(tmp_path, table, clients, tokenizer, cutoff_len=1) as builder:
        builder.prefetch([0])  # fails in the background, silently
        with pytest.raises(FedsimInputError, match=r"must be >= 2"):
            builder.ensure([0])

    assert blocks_on_disk(tmp_path) == []


@pytest.mark.ray
def test_object_store_hands_over_each_block_put_once(
    tmp_path: Path,
    table: pa.Table,
    clients: list[np.ndarray],
    tokenizer: PreTrainedTokenizerFast,
    ray_local: Any,
) -> None:
    with new_builder(tmp_path, table, clients, tokenizer) as builder:
        builder.ensure([0, 4, 5])
        ref = builder.object_ref(4)
        assert builder.object_ref(5) == ref  # the same block: one put
        first = builder.object_ref(0)
        builder.keep_refs([4])  # a new round needs block 2 only
        assert builder.object_ref(4) == ref
        assert builder.object_ref(0) != first  # dropped, then put again

    store = ShardStore.from_index((tmp_path / "index.json").read_text(), where=str(tmp_path))
    store.add_block(2, ray_local.get(ref))
    expected_ids, _ = tokenize_records(table, tokenizer, ALPACA, 512, False)
    assert store.client_examples(5).to_lists()[0] == [expected_ids[i] for i in clients[5]]
