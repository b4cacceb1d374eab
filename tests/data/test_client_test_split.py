"""The per-client held-out slice (`data.test_per_client`): seeded, removed from the client's
training records, recorded in partition.json, and absent (changing nothing) when off."""

import dataclasses

import numpy as np
import pytest

from fedsim.config import DataConfig, ExperimentConfig, PartitionConfig, validate
from fedsim.data.partitioners import hold_out_per_client
from fedsim.data.pipeline import format_partition_table, prepare_data
from fedsim.errors import FedsimInputError
from fedsim.seeds import Stream, generator


def _rngs(n: int, seed: int = 0) -> list[np.random.Generator]:
    return [generator(seed, Stream.CLIENT_TEST, c) for c in range(n)]


def test_each_client_loses_exactly_its_rounded_fraction() -> None:
    parts = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 15), np.arange(15, 40)]

    train, test = hold_out_per_client(parts, 0.2, _rngs(4))

    # 10 -> 2, 3 -> 0.6 -> 1, 2 -> 0.4 -> at least 1, 25 -> 5 (half up, not to even)
    assert [len(t) for t in test] == [2, 1, 1, 5]
    for part, tr, te in zip(parts, train, test, strict=True):
        assert np.array_equal(np.sort(np.concatenate([tr, te])), part)
        assert not np.intersect1d(tr, te).size
        assert list(tr) == sorted(tr) and list(te) == sorted(te)


def test_a_clients_slice_depends_on_its_own_records_and_seed_only() -> None:
    parts = [np.arange(0, 20), np.arange(20, 40)]
    _, test = hold_out_per_client(parts, 0.25, _rngs(2))
    _, again = hold_out_per_client([parts[0], np.arange(20, 31)], 0.25, _rngs(2))
    _, other_seed = hold_out_per_client(parts, 0.25, _rngs(2, seed=1))

    assert np.array_equal(test[0], again[0])  # client 1's records changed, client 0's slice not
    assert not np.array_equal(test[1], test[0] + 20)  # each client draws its own permutation
    assert not all(np.array_equal(a, b) for a, b in zip(test, other_seed, strict=True))


def test_a_client_left_with_nothing_to_train_is_an_error_naming_the_field() -> None:
    with pytest.raises(FedsimInputError, match=r"data.test_per_client: client 1 has 1 record"):
        hold_out_per_client([np.arange(5), np.arange(5, 6)], 0.1, _rngs(2))


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_config_refuses_fractions_outside_zero_to_one(value: float) -> None:
    cfg = ExperimentConfig()
    cfg.data.test_per_client = value

    assert any(p.startswith("data.test_per_client: expected a fraction") for p in validate(cfg))


def _data(**changes: object) -> DataConfig:
    return dataclasses.replace(
        DataConfig(
            builtin_records=400,
            num_clients=8,
            test_per_category=2,
            partition=PartitionConfig(kind="dirichlet", alpha=0.5),
        ),
        **changes,
    )


def test_off_changes_neither_the_partition_nor_partition_json_nor_the_config_hash() -> None:
    plain = prepare_data(_data(), seed=3)
    off = prepare_data(_data(test_per_client=0.0), seed=3)
    on = prepare_data(_data(test_per_client=0.2), seed=3)

    assert off.partition_hash() == plain.partition_hash()
    assert "test_per_client" not in off.summary()
    assert on.partition_hash() != plain.partition_hash()
    cfg = ExperimentConfig()
    assert "test_per_client" in cfg.to_dict()["data"]  # written out, yet not in the hash:
    on_cfg = ExperimentConfig()
    on_cfg.data.test_per_client = 0.2
    assert cfg.training_hash() != on_cfg.training_hash()
    on_cfg.data.test_per_client = 0.0
    assert cfg.training_hash() == on_cfg.training_hash()


def test_slices_come_out_of_the_clients_training_records_and_into_partition_json() -> None:
    plain = prepare_data(_data(), seed=3)
    on = prepare_data(_data(test_per_client=0.2), seed=3)
    summary = on.summary()
    source_index = on.table.column("source_index").to_numpy()

    assert np.array_equal(on.test, plain.test)  # the global test split is untouched
    per_client = summary["test_per_client"]
    assert per_client["fraction"] == 0.2
    for cid, (before, train, held) in enumerate(
        zip(plain.clients, on.clients, on.client_test, strict=True)
    ):
        assert np.array_equal(np.sort(np.concatenate([train, held])), before)
        entry = per_client["clients"][str(cid)]
        assert entry["source_index"] == source_index[held].tolist()
        assert entry["records"] == len(held) == max(1, int(np.floor(0.2 * len(before) + 0.5)))
        assert summary["clients"][str(cid)]["records"] == len(train)
    assert per_client["records"] == sum(len(h) for h in on.client_test)
    assert "in the clients' own test slices" in format_partition_table(summary)
    # the same seed gives the same slices; another seed other ones
    assert prepare_data(_data(test_per_client=0.2), seed=3).summary() == summary
    assert prepare_data(_data(test_per_client=0.2), seed=4).summary() != summary
