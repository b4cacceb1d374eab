"""Tokenisation with prompt masking, and the memory-mapped client shard store."""

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from transformers import PreTrainedTokenizerFast

from fedsim.data.partitioners import IID
from fedsim.data.records import make_table
from fedsim.data.shards import (
    IGNORE_INDEX,
    SHARD_SCHEMA,
    ShardStore,
    block_file,
    choose_block_size,
    encode_records,
    pack_block,
    tokenize_records,
    tokenize_records_compact,
    write_shards,
)
from fedsim.data.synthetic import generate_instructions
from fedsim.data.templates import get_template
from fedsim.errors import FedsimInputError

ALPACA = get_template("alpaca")


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return make_table(generate_instructions(64, seed=0))


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_labels_mask_exactly_the_prompt(
    table: pa.Table, tokenizer: PreTrainedTokenizerFast, template: str
) -> None:
    input_ids, labels = tokenize_records(table, tokenizer, get_template(template), 512, False)

    for row, ids, labs in zip(table.to_pylist(), input_ids, labels, strict=True):
        prompt = get_template(template).render(row["instruction"], row["context"])
        prompt_ids = [tokenizer.bos_token_id, *encode(tokenizer, prompt)]
        assert ids == [*prompt_ids, *encode(tokenizer, row["response"]), tokenizer.eos_token_id]
        assert labs == [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]


def test_train_on_inputs_keeps_every_label(
    table: pa.Table, tokenizer: PreTrainedTokenizerFast
) -> None:
    input_ids, labels = tokenize_records(table, tokenizer, ALPACA, 512, True)

    assert labels == input_ids
    assert all(ids[0] == tokenizer.bos_token_id for ids in input_ids)


def test_cutoff_truncates_and_drops_eos(
    table: pa.Table, tokenizer: PreTrainedTokenizerFast
) -> None:
    cutoff = 40  # the Alpaca prompt alone is longer, so every example is cut
    full, _ = tokenize_records(table, tokenizer, ALPACA, 512, False)

    input_ids, labels = tokenize_records(table, tokenizer, ALPACA, cutoff, False)

    for long_ids, ids, labs in zip(full, input_ids, labels, strict=True):
        assert ids == long_ids[:cutoff]
        assert ids[-1] != tokenizer.eos_token_id
        assert labs == [IGNORE_INDEX] * cutoff  # only prompt tokens survived


def test_eos_is_appended_when_there_is_room(
    table: pa.Table, tokenizer: PreTrainedTokenizerFast
) -> None:
    full, _ = tokenize_records(table, tokenizer, ALPACA, 512, False)
    cutoff = max(len(ids) for ids in full)  # the longest example just fits, with its EOS

    input_ids, _ = tokenize_records(table, tokenizer, ALPACA, cutoff, False)

    assert input_ids == full


def test_tokenizer_without_bos_gets_none(
    table: pa.Table, tokenizer: PreTrainedTokenizerFast
) -> None:
    no_bos = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>", pad_token="<pad>"
    )

    with_bos, _ = tokenize_records(table, tokenizer, ALPACA, 512, False)
    without, labels = tokenize_records(table, no_bos, ALPACA, 512, False)

    assert without == [ids[1:] for ids in with_bos]
    assert labels[0][0] == IGNORE_INDEX


def test_real_dolly_records_mask_the_prompt(
    dolly_table: pa.Table, tokenizer: PreTrainedTokenizerFast
) -> None:
    sample = dolly_table.slice(0, 100)  # long contexts, non-ASCII text

    input_ids, labels = tokenize_records(sample, tokenizer, ALPACA, 256, False)

    for row, ids, labs in zip(sample.to_pylist(), input_ids, labels, strict=True):
        prompt_len = 1 + len(encode(tokenizer, ALPACA.render(row["instruction"], row["context"])))
        masked = min(prompt_len, len(ids))
        assert len(ids) <= 256
        assert labs[:masked] == [IGNORE_INDEX] * masked
        assert labs[masked:] == ids[masked:]


def test_cutoff_below_two_is_rejected(table: pa.Table, tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(FedsimInputError, match=r"client\.max_length: must be >= 2"):
        tokenize_records(table, tokenizer, ALPACA, 1, False)


# --- shard store ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(
    table: pa.Table, tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[np.ndarray], list[list[int]], list[list[int]]]:
    input_ids, labels = tokenize_records(table, tokenizer, ALPACA, 512, False)
    categories = table.column("category").to_numpy(zero_copy_only=False)
    clients = IID().split(categories, 5, np.random.default_rng(0))
    path = tmp_path_factory.mktemp("shards")
    write_shards(path, clients, input_ids, labels, block_size=2)  # blocks {0,1} {2,3} {4}
    return path, clients, input_ids, labels


def test_store_returns_exactly_each_clients_rows(written: tuple) -> None:
    path, clients, input_ids, labels = written

    store = ShardStore(path)

    assert store.num_clients == 5
    for client, positions in enumerate(clients):
        examples = store.client_examples(client)
        assert store.num_records(client) == len(examples) == len(positions)
        got_ids, got_labels = examples.to_lists()
        assert got_ids == [input_ids[i] for i in positions]
        assert got_labels == [labels[i] for i in positions]
        assert examples.lengths().tolist() == [len(input_ids[i]) for i in positions]


def test_store_examples_are_views_of_the_mapped_file(written: tuple) -> None:
    path, clients, input_ids, _ = written

    ids, labs = ShardStore(path).client_examples(2)[-1]

    assert ids.tolist() == input_ids[clients[2][-1]]
    assert not ids.flags.writeable and not labs.flags.writeable  # read-only: mapped, not copied


def test_file_layout_is_one_arrow_file_per_block_grouped_by_client(written: tuple) -> None:
    path, clients, _, _ = written

    index = json.loads((path / "index.json").read_text())
    tables = []
    for block in range(3):
        with pa.memory_map(str(path / block_file(block))) as source:
            tables.append(pa.ipc.open_file(source).read_all())

    assert sorted(p.name for p in path.iterdir()) == [
        "block_00000.arrow",
        "block_00001.arrow",
        "block_00002.arrow",
        "index.json",
    ]
    assert all(t.schema == SHARD_SCHEMA for t in tables)
    sizes = [len(c) for c in clients]
    assert index == {"num_clients": 5, "block_size": 2, "offsets": [0, *np.cumsum(sizes)]}
    assert [t.column("client").to_pylist() for t in tables] == [
        np.repeat(clients_ids, [sizes[c] for c in clients_ids]).tolist()
        for clients_ids in ([0, 1], [2, 3], [4])
    ]


def test_rewriting_replaces_the_shards(written: tuple, tmp_path: Path) -> None:
    _, clients, input_ids, labels = written
    write_shards(tmp_path, clients, input_ids, labels)

    write_shards(tmp_path, clients[:2], input_ids, labels)

    store = ShardStore(tmp_path)
    assert store.num_clients == 2
    assert store.client_examples(1).to_lists()[0] == [input_ids[i] for i in clients[1]]


def test_store_without_index_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(FedsimInputError, match=r"index\.json: shard index missing"):
        ShardStore(tmp_path)


def test_store_with_mismatched_index_is_an_input_error(written: tuple, tmp_path: Path) -> None:
    _, clients, input_ids, labels = written
    write_shards(tmp_path, clients, input_ids, labels)
    index = {"num_clients": 1, "block_size": 1, "offsets": [0, 3]}
    (tmp_path / "index.json").write_text(json.dumps(index))

    with pytest.raises(
        FedsimInputError,
        match=r"block_00000\.arrow: does not match index\.json \(\d+ rows, index says 3\)",
    ):
        ShardStore(tmp_path).client_examples(0)


def test_unknown_client_id_is_an_index_error(written: tuple) -> None:
    with pytest.raises(IndexError, match=r"client 5 out of range for 5 clients"):
        ShardStore(written[0]).num_records(5)


def test_compact_tokenisation_is_the_same_in_int32_arrays_and_writes_the_same_file(
    table: pa.Table, tokenizer: PreTrainedTokenizerFast, written: tuple, tmp_path: Path
) -> None:
    path, clients, input_ids, labels = written
    # chunk_rows=7 makes several chunks, the last one partial
    ids, labs = tokenize_records_compact(table, tokenizer, ALPACA, 512, False, chunk_rows=7)

    assert all(a.dtype == np.int32 for a in ids + labs)
    assert [a.tolist() for a in ids] == input_ids
    assert [a.tolist() for a in labs] == labels
    write_shards(tmp_path, clients, ids, labs, block_size=2)
    for block in range(3):
        assert (tmp_path / block_file(block)).read_bytes() == (
            path / block_file(block)
        ).read_bytes()


def test_encode_records_is_tokenize_records_in_flat_int32_arrays(
    table: pa.Table, tokenizer: PreTrainedTokenizerFast
) -> None:
    input_ids, labels = tokenize_records(table, tokenizer, ALPACA, 40, False)

    # chunk_rows=7: several chunks, the last one partial
    encoded = encode_records(table, tokenizer, ALPACA, 40, False, chunk_rows=7)

    assert encoded.input_ids.dtype == encoded.labels.dtype == np.int32
    cuts = encoded.offsets
    assert [encoded.input_ids[a:b].tolist() for a, b in itertools.pairwise(cuts)] == input_ids
    assert [encoded.labels[a:b].tolist() for a, b in itertools.pairwise(cuts)] == labels
    assert encoded.no_answer() == sum(all(x == IGNORE_INDEX for x in lab) for lab in labels) > 0


def test_block_size_aims_at_a_few_dozen_records_per_block() -> None:
    assert choose_block_size([8] * 10_000) == 8  # 64 records a block
    assert choose_block_size([8] * 5) == 5  # every client in one block
    assert choose_block_size([3] * 100, target=30) == 10
    assert choose_block_size([5_000, 7_000]) == 1  # at least one client
    assert choose_block_size([]) == 1


def test_blocks_open_lazily_and_only_a_few_stay_open(written: tuple) -> None:
    path, clients, input_ids, _ = written
    store = ShardStore(path, open_blocks=2)

    for client in (0, 2, 4):
        assert store.client_examples(client).to_lists()[0] == [
            input_ids[i] for i in clients[client]
        ]

    assert [store.has_block(b) for b in range(3)] == [False, True, True]
    assert store.client_examples(1).to_lists()[0] == [input_ids[i] for i in clients[1]]
    assert [store.has_block(b) for b in range(3)] == [True, False, True]


def test_missing_block_file_is_an_input_error_naming_it(written: tuple, tmp_path: Path) -> None:
    _, clients, input_ids, labels = written
    write_shards(tmp_path, clients, input_ids, labels, block_size=2)
    (tmp_path / block_file(1)).unlink()
    store = ShardStore(tmp_path)

    assert store.num_records(3) == len(clients[3])  # the index alone answers this
    with pytest.raises(FedsimInputError, match=r"block_00001\.arrow: cannot read shard file"):
        store.client_examples(3)


def test_corrupt_block_file_is_an_input_error_naming_it(written: tuple, tmp_path: Path) -> None:
    _, clients, input_ids, labels = written
    write_shards(tmp_path, clients, input_ids, labels, block_size=2)
    data = (tmp_path / block_file(2)).read_bytes()
    (tmp_path / block_file(2)).write_bytes(data[: len(data) // 2])

    with pytest.raises(FedsimInputError, match=r"block_00002\.arrow: cannot read shard file"):
        ShardStore(tmp_path).client_examples(4)


def test_store_from_index_reads_blocks_handed_in_as_buffers(written: tuple) -> None:
    path, clients, input_ids, labels = written
    store = ShardStore.from_index((path / "index.json").read_text(), where="remote/shards")

    with pytest.raises(
        FedsimInputError, match=r"remote/shards/block_00001\.arrow: block not handed"
    ):
        store.client_examples(2)
    store.add_block(1, pack_block(path, 1))

    got_ids, got_labels = store.client_examples(2).to_lists()
    assert got_ids == [input_ids[i] for i in clients[2]]
    assert got_labels == [labels[i] for i in clients[2]]
