"""The built-in data as the pipeline loads it: generated in batches straight into Arrow, and
fingerprinted with its version so that other records refuse `--resume`."""

import pytest

from fedsim.data import pipeline
from fedsim.data.pipeline import builtin_fingerprint, builtin_table
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
