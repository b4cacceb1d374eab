"""The built-in data as the pipeline loads it: generated in batches straight into Arrow (and
memory-mapped from the cache when large), fingerprinted with its version so that other records
refuse `--resume`; and the prepared partition and partition.json, pinned bit for bit."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import DataConfig, PartitionConfig
from fedsim.data import pipeline
from fedsim.data.partitioners import ClientPositions
from fedsim.data.pipeline import (
    builtin_fingerprint,
    builtin_table,
    mapped_builtin_table,
    prepare_data,
    write_partition,
)
from fedsim.data.records import make_table
from fedsim.data.synthetic import generate_instructions


@pytest.mark.parametrize("num_records", [0, 1, 7, 8, 20])
def test_batched_generation_gives_the_same_table(monkeypatch, num_records) -> None:
    monkeypatch.setattr(pipeline, "GENERATED_BATCH", 8)  # several batches, and a partial one

    table = builtin_table(num_records)

    expected = make_table(generate_instructions(num_records, seed=pipeline.BUILTIN_DATA_SEED))
    assert table.equals(expected)
    assert table.column("source_index").to_pylist() == list(range(num_records))


def test_generated_data_of_another_version_has_another_fingerprint() -> None:
    v2 = builtin_fingerprint("builtin:quickstart", 2000, version=2)
    v3 = builtin_fingerprint("builtin:quickstart", 2000, version=3)

    assert v2 == "builtin:quickstart:2000:1234"  # what version-2 runs recorded: they still resume
    assert v3 != v2 and v3.endswith(":v3")
    assert builtin_fingerprint("builtin:quickstart", 2001, version=3) != v3


def test_large_generated_data_is_mapped_from_one_cache_file(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path))

    table = mapped_builtin_table(20_000)  # written by a child process, then mapped

    assert table.equals(builtin_table(20_000))
    assert table.column("instruction").num_chunks == 1  # `take` reads only the rows it takes
    (cached,) = (tmp_path / "data").iterdir()
    assert cached.name == "quickstart-20000-1234-v2.arrow"

    def no_generation(num_records: int) -> None:
        raise AssertionError("generated again")

    monkeypatch.setattr(pipeline, "_builtin_batches", no_generation)
    assert mapped_builtin_table(20_000).equals(table)  # read from the file, not generated again


def test_an_unreadable_or_unwritable_cache_costs_only_time(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path))
    expected = builtin_table(12)
    cached = tmp_path / "data" / "quickstart-12-1234-v2.arrow"
    cached.parent.mkdir()
    cached.write_bytes(b"not arrow")

    assert mapped_builtin_table(12).equals(expected)  # rewritten
    assert mapped_builtin_table(12).equals(expected)  # and read back

    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(cached))  # a file: no folder can be made in it
    assert mapped_builtin_table(12).equals(expected)


@pytest.mark.parametrize("num_records", [0, 1, 20])
def test_the_cache_file_holds_the_generated_table(monkeypatch, tmp_path, num_records) -> None:
    monkeypatch.setattr(pipeline, "GENERATED_BATCH", 8)  # several chunks become one batch

    pipeline.write_builtin_file(num_records, tmp_path / "t.arrow")

    mapped = pipeline._read_mapped(tmp_path / "t.arrow", num_records)
    assert mapped is not None and mapped.equals(builtin_table(num_records))
    assert pipeline._read_mapped(tmp_path / "t.arrow", num_records + 1) is None


def test_large_builtin_sources_load_mapped(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pipeline, "MAPPED_RECORDS", 30)

    small, _ = pipeline.load_table(DataConfig(builtin_records=29))
    large, _ = pipeline.load_table(DataConfig(builtin_records=30))

    assert [p.name for p in (tmp_path / "data").iterdir()] == ["quickstart-30-1234-v2.arrow"]
    assert small.equals(builtin_table(29)) and large.equals(builtin_table(30))


# --- the prepared partition and partition.json, pinned --------------------------------------

# partition_hash and sha256 of partition.json's bytes (first 16 hex digits), as written before
# the partition became flat arrays and partition.json a stream (issue 16): runs and their files
# must not change.
PINNED = {
    "dirichlet": ("016c8793a7ccfe92", "f716b6fa041983c9"),
    "dirichlet_tpc": ("501ea477206d7297", "33c49cd5e3ba610e"),
    "iid": ("f528f4b4b0ddef41", "06b53a49eff84591"),
    "iid_notest": ("0a03d8162a09090b", "90f898b13564e528"),
    "shards": ("6880efb81e05e2d3", "18a061418c24dcde"),
    "by_category12": ("16722db6ee140188", "43464bedb9e933b5"),
    "by_category3": ("17bd9f809525be04", "0855d9c4ac921ad3"),
    "dirichlet_small_alpha": ("a93cc3d536448685", "7cbddbe5462c2573"),
    "unicode_iid": ("f813f2ece044cbdf", "f6ec68f71577f58f"),
    "unicode_dirichlet_tpc": ("03d546aa8c0aeea1", "bc0563e3fe984d05"),
    "max_records": ("e91675d7e5b2049e", "29725e155454ead6"),
    "split_file": ("992ec9f946c2e46c", "6dbfe06252dff0b6"),
}
CATEGORIES = ["ä", "b", "Z", "", "日本", "a b", '"q"', "é"]
"""Non-ASCII, empty, quoted: names that sort and escape differently."""


def _configs(folder: Path) -> dict[str, DataConfig]:
    source = folder / "u.jsonl"
    rows = [
        {"instruction": f"i{i}", "response": f"r{i}", "category": CATEGORIES[(i * 7) % 8]}
        for i in range(300)
    ]
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    split = folder / "split.json"
    split.write_text(
        json.dumps({"clients": [[5, 1, 9, 4], [0, 2, 8], [3, 7, 6, 10, 11]], "test": [299, 12]})
    )
    base = DataConfig(
        builtin_records=400,
        num_clients=8,
        test_per_category=2,
        partition=PartitionConfig(kind="dirichlet", alpha=0.5),
    )
    r = dataclasses.replace
    by_category = PartitionConfig(kind="by_category")
    return {
        "dirichlet": base,
        "dirichlet_tpc": r(base, test_per_client=0.2),
        "iid": r(base, partition=PartitionConfig(kind="iid")),
        "iid_notest": r(base, test_per_category=0, num_clients=13),
        "shards": r(
            base, num_clients=16, partition=PartitionConfig(kind="shards", shards_per_client=2)
        ),
        "by_category12": r(base, num_clients=12, partition=by_category),
        "by_category3": r(base, num_clients=3, partition=by_category, test_per_client=0.3),
        "dirichlet_small_alpha": r(
            base,
            builtin_records=2000,
            num_clients=50,
            test_per_category=0,
            partition=PartitionConfig(kind="dirichlet", alpha=0.1, min_size=3),
        ),
        "unicode_iid": r(
            base,
            source=str(source),
            num_clients=7,
            test_per_category=3,
            partition=PartitionConfig(kind="iid"),
        ),
        "unicode_dirichlet_tpc": r(
            base, source=str(source), num_clients=9, test_per_category=1, test_per_client=0.25
        ),
        "max_records": r(base, max_records=333, num_clients=5),
        "split_file": r(
            base,
            source=str(source),
            num_clients=3,
            test_per_client=0.5,
            partition=PartitionConfig(kind="split_file", path=str(split)),
        ),
    }


def test_partitions_and_partition_json_are_unchanged_bit_for_bit(tmp_path: Path) -> None:
    for name, cfg in _configs(tmp_path).items():
        data = prepare_data(cfg, seed=3)
        write_partition(tmp_path / "partition.json", data)
        text = (tmp_path / "partition.json").read_bytes()

        assert isinstance(data.clients, ClientPositions), name
        assert text.decode() == json.dumps(data.summary(), indent=1), name
        pinned = (data.partition_hash()[:16], hashlib.sha256(text).hexdigest()[:16])
        assert pinned == PINNED[name], name


def test_the_hash_is_a_loop_over_the_parts(tmp_path: Path) -> None:
    data = prepare_data(_configs(tmp_path)["dirichlet_tpc"], seed=3)
    digest = hashlib.sha256(data.fingerprint.encode())
    for part in [*data.clients, data.test]:
        digest.update(np.asarray(part, dtype=np.int64).tobytes() + b"|")
    digest.update(b"client_test|")
    for part in data.client_test:
        digest.update(np.asarray(part, dtype=np.int64).tobytes() + b"|")

    assert data.partition_hash() == digest.hexdigest()
    # Blocks of a few records each: the same bytes in other pieces.
    small = hashlib.sha256()
    pipeline._hash_parts(small, data.clients, max_records=3)
    whole = hashlib.sha256()
    pipeline._hash_parts(whole, data.clients)
    assert small.hexdigest() == whole.hexdigest()


def test_partition_json_blocks_do_not_change_its_text(monkeypatch, tmp_path: Path) -> None:
    data = prepare_data(_configs(tmp_path)["unicode_dirichlet_tpc"], seed=3)
    whole = "".join(data.partition_json())
    monkeypatch.setattr(pipeline, "CLIENT_BLOCK", 2)

    assert "".join(data.partition_json()) == whole
