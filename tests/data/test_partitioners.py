"""Partitioners: every record in exactly one client, reproducible per seed, clear errors."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fedsim.data.partitioners import (
    IID,
    ByCategory,
    ClientPositions,
    Dirichlet,
    Partitioner,
    Shards,
    SplitFile,
    category_histogram,
    hold_out_test,
    make_partitioner,
    positions_for,
)
from fedsim.data.synthetic import generate_instructions
from fedsim.errors import FedsimInputError

PARTITIONERS = [IID(), Dirichlet(alpha=0.5), Shards(shards_per_client=2), ByCategory()]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def synthetic_categories() -> np.ndarray:
    return np.array([r["category"] for r in generate_instructions(800, seed=0)])


@pytest.fixture(scope="module")
def dolly_categories(dolly_table: pa.Table) -> np.ndarray:
    return dolly_table.column("category").to_numpy(zero_copy_only=False)


def assert_partition(parts: list[np.ndarray], num_records: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64
        assert len(part) > 0
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    everything = np.concatenate(parts)
    assert len(everything) == num_records  # disjoint ...
    assert np.array_equal(np.sort(everything), np.arange(num_records))  # ... and complete


@pytest.mark.parametrize("partitioner", PARTITIONERS, ids=lambda p: p.kind)
@pytest.mark.parametrize(("data", "num_clients"), [("synthetic", 10), ("dolly", 100)])
def test_partition_invariants(
    partitioner: Partitioner, data: str, num_clients: int, request: pytest.FixtureRequest
) -> None:
    categories = request.getfixturevalue(f"{data}_categories")

    parts = partitioner.split(categories, num_clients, rng(0))
    again = partitioner.split(categories, num_clients, rng(0))
    other = partitioner.split(categories, num_clients, rng(1))

    assert_partition(parts, len(categories), num_clients)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_differ_by_at_most_one(synthetic_categories: np.ndarray) -> None:
    sizes = [len(p) for p in IID().split(synthetic_categories, 7, rng())]

    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_is_more_skewed(dolly_categories: np.ndarray) -> None:
    def mean_categories_per_client(alpha: float) -> float:
        parts = Dirichlet(alpha).split(dolly_categories, 20, rng())
        return np.mean([len(category_histogram(dolly_categories, p)) for p in parts])

    assert mean_categories_per_client(0.05) < mean_categories_per_client(100.0)
    assert mean_categories_per_client(100.0) == 8


def test_dirichlet_reaches_min_size(synthetic_categories: np.ndarray) -> None:
    parts = Dirichlet(alpha=0.5, min_size=40).split(synthetic_categories, 10, rng())

    assert min(len(p) for p in parts) >= 40


def test_dirichlet_impossible_min_size_fails_at_once(synthetic_categories: np.ndarray) -> None:
    with pytest.raises(FedsimInputError, match=r"10 clients x min_size=81 needs 810 records"):
        Dirichlet(alpha=0.5, min_size=81).split(synthetic_categories, 10, rng())


def test_dirichlet_gives_up_after_max_attempts(synthetic_categories: np.ndarray) -> None:
    # Possible in principle (80 each), but never drawn with such skew: an error, not a hang.
    partitioner = Dirichlet(alpha=0.01, min_size=80, max_attempts=20)

    with pytest.raises(
        FedsimInputError,
        match=r"min_size=80 .* after 20 attempts \(at best \d+ clients fell short\); lower",
    ):
        partitioner.split(synthetic_categories, 10, rng())


def test_shards_gives_each_client_k_contiguous_shards(dolly_categories: np.ndarray) -> None:
    k, num_clients = 2, 40
    parts = Shards(shards_per_client=k).split(dolly_categories, num_clients, rng())

    # Rank of each record in (category, position) order; a shard is a run of ranks.
    rank = np.empty(len(dolly_categories), dtype=np.int64)
    rank[np.argsort(dolly_categories, kind="stable")] = np.arange(len(dolly_categories))
    shard_size = len(dolly_categories) / (k * num_clients)
    for part in parts:
        ranks = np.sort(rank[part])
        runs = 1 + np.count_nonzero(np.diff(ranks) > 1)
        assert runs <= k
        assert abs(len(part) - k * shard_size) <= k
    seen = [len(category_histogram(dolly_categories, p)) for p in parts]
    assert sum(n <= k for n in seen) > num_clients // 2
    assert max(seen) <= 2 * k


def test_by_category_with_more_clients_than_categories(synthetic_categories: np.ndarray) -> None:
    parts = ByCategory().split(synthetic_categories, 16, rng())

    names = sorted(set(synthetic_categories))
    for client, part in enumerate(parts):
        assert list(category_histogram(synthetic_categories, part)) == [names[client % 8]]


def test_by_category_with_fewer_clients_than_categories(synthetic_categories: np.ndarray) -> None:
    parts = ByCategory().split(synthetic_categories, 3, rng())

    names = sorted(set(synthetic_categories))
    for client, part in enumerate(parts):
        assert list(category_histogram(synthetic_categories, part)) == names[client::3]


def test_empty_client_is_an_error_naming_kind_and_client() -> None:
    categories = np.array(["a"] + ["b"] * 10)  # "a" has 1 record for clients 0 and 2

    with pytest.raises(FedsimInputError, match=r"client 2 would get no records with kind=by_cat"):
        ByCategory().split(categories, 4, rng())


@pytest.mark.parametrize("partitioner", PARTITIONERS, ids=lambda p: p.kind)
def test_more_clients_than_records_is_an_error(partitioner: Partitioner) -> None:
    with pytest.raises(FedsimInputError, match=r"data\.num_clients: 5 clients but only 4"):
        partitioner.split(np.array(["a", "b", "a", "b"]), 5, rng())


def test_too_many_shards_is_an_error() -> None:
    with pytest.raises(FedsimInputError, match=r"kind=shards needs 6 shards"):
        Shards(shards_per_client=3).split(np.array(["a"] * 5), 2, rng())


def test_make_partitioner_builds_each_kind() -> None:
    assert isinstance(make_partitioner("iid"), IID)
    dirichlet = make_partitioner("dirichlet", alpha=0.3, min_size=5)
    assert isinstance(dirichlet, Dirichlet)
    assert (dirichlet.alpha, dirichlet.min_size) == (0.3, 5)
    assert make_partitioner("shards", shards_per_client=4).shards_per_client == 4
    assert isinstance(make_partitioner("by_category"), ByCategory)
    assert make_partitioner("split_file", path="s.json").path == "s.json"


def test_make_partitioner_rejects_unknown_kind_and_bad_parameters() -> None:
    with pytest.raises(FedsimInputError, match=r"expected one of iid, dirichlet, shards, by_cat"):
        make_partitioner("random")
    with pytest.raises(FedsimInputError, match=r"data\.partition\.path: required"):
        make_partitioner("split_file")
    with pytest.raises(FedsimInputError, match=r"data\.partition\.alpha: must be > 0"):
        make_partitioner("dirichlet", alpha=0)


def test_hold_out_test_takes_n_per_category(synthetic_categories: np.ndarray) -> None:
    train, test = hold_out_test(synthetic_categories, 10, rng())

    assert category_histogram(synthetic_categories, test) == {
        name: 10 for name in sorted(set(synthetic_categories))
    }
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(800))
    assert not np.array_equal(test, hold_out_test(synthetic_categories, 10, rng(1))[1])


def test_hold_out_test_needs_a_training_record_per_category() -> None:
    with pytest.raises(FedsimInputError, match=r"category 'a' has 2 records; holding out 2 needs"):
        hold_out_test(np.array(["a", "a", "b", "b", "b"]), 2, rng())


def test_category_histogram() -> None:
    categories = np.array(["b", "a", "b", "c"])

    assert category_histogram(categories, np.array([0, 1, 2])) == {"a": 1, "b": 2}


# --- split files ----------------------------------------------------------------------------------


def test_reference_split_file_is_reproduced_exactly(
    dolly_split: Path, dolly_table: pa.Table
) -> None:
    expected = json.loads(dolly_split.read_text())
    source_index = dolly_table.column("source_index").to_numpy()
    categories = dolly_table.column("category").to_numpy(zero_copy_only=False)

    clients, test = SplitFile(str(dolly_split)).load()
    client_rows = [positions_for(source_index, c, str(dolly_split)) for c in clients]
    test_rows = positions_for(source_index, test, str(dolly_split), key="test")

    assert len(clients) == 10
    for rows, lines in zip(client_rows, expected["clients"], strict=True):
        assert source_index[rows].tolist() == lines
    assert source_index[test_rows].tolist() == sorted(expected["test"])
    assert category_histogram(categories, test_rows) == {
        name: 10 for name in sorted(set(categories))
    }
    assert len(np.concatenate(client_rows)) + len(test_rows) == dolly_table.num_rows


def write_split(tmp_path: Path, content: object) -> str:
    path = tmp_path / "split.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"split\.json:1: not valid JSON"),
        ([[0, 1]], r"expected an object with a \"clients\" list"),
        ({"clients": [[0, 1], ["2"]]}, r"clients\[1\] must be a list of non-negative integer"),
        ({"clients": [[0, 1], [1, 2]]}, r"line 1 is in both clients\[0\] and clients\[1\]"),
        ({"clients": [[0, 1], [2]], "test": [2]}, r"line 2 is in both a client and \"test\""),
        ({"clients": [[0, 0]]}, r"clients\[0\] lists line 0 twice"),
        ({"clients": [[0], []]}, r"clients\[1\] is empty"),
    ],
)
def test_bad_split_files_name_the_file_and_key(
    tmp_path: Path, content: object, message: str
) -> None:
    with pytest.raises(FedsimInputError, match=message):
        SplitFile(write_split(tmp_path, content)).load()


def test_missing_split_file() -> None:
    with pytest.raises(FedsimInputError, match=r"data\.partition\.path: split file not found"):
        SplitFile("no/such/split.json").load()


def test_positions_for_maps_source_lines_to_rows() -> None:
    source_index = np.array([0, 1, 3, 4])  # line 2 was blank

    assert positions_for(source_index, np.array([4, 0, 3]), "s.json").tolist() == [3, 0, 2]
    with pytest.raises(FedsimInputError, match=r"s\.json: clients names line 2, which is not"):
        positions_for(source_index, np.array([2]), "s.json")


def test_positions_for_out_of_range_line(dolly_table: pa.Table) -> None:
    source_index = dolly_table.column("source_index").to_numpy()

    with pytest.raises(
        FedsimInputError,
        match=r"s\.json: clients\[3\] names line 20000 but the source has 15011 records",
    ):
        positions_for(source_index, np.array([5, 20000]), "s.json", key="clients[3]")


# --- the split as flat arrays, categories as codes (issue 16) ---------------------------------


def test_client_positions_behave_as_a_list_of_arrays() -> None:
    parts = [np.array([3, 5]), np.array([0]), np.array([1, 2, 4])]
    positions = ClientPositions.from_parts(parts)

    assert len(positions) == 3 and positions.sizes().tolist() == [2, 1, 3]
    assert [p.tolist() for p in positions] == [p.tolist() for p in parts]
    assert positions[-1].tolist() == [1, 2, 4] and positions[1].dtype == np.int64
    assert [p.tolist() for p in positions[1:]] == [[0], [1, 2, 4]]
    assert positions.owners().tolist() == [0, 0, 1, 2, 2, 2]
    assert positions.owners(1, 3).tolist() == [1, 2, 2, 2]
    assert positions.map(np.arange(10) * 10)[0].tolist() == [30, 50]
    with pytest.raises(IndexError):
        positions[3]
    with pytest.raises(ValueError, match="read-only"):
        positions[0][0] = 7  # a view into the split: nobody edits it through one
    flat = np.array([2, 0, 1])
    ClientPositions(flat, np.array([0, 1, 3]))
    flat[0] = 9  # the caller's own array stays writable
    assert len(ClientPositions.empty()) == 0
    assert ClientPositions.single(np.array([4, 7]))[0].tolist() == [4, 7]


@pytest.mark.parametrize("partitioner", PARTITIONERS, ids=lambda p: p.kind)
def test_integer_codes_split_as_the_names_do(
    partitioner: Partitioner, dolly_categories: np.ndarray
) -> None:
    names, codes = np.unique(dolly_categories, return_inverse=True)  # codes rank the names

    by_name = partitioner.split(dolly_categories, 30, rng(0))
    by_code = partitioner.split(codes.astype(np.int32), 30, rng(0))

    assert isinstance(by_code, ClientPositions)
    assert np.array_equal(by_name.flat, by_code.flat)
    assert np.array_equal(by_name.offsets, by_code.offsets)
    train, test = hold_out_test(dolly_categories, 3, rng(0))
    train_c, test_c = hold_out_test(codes, 3, rng(0), list(names))
    assert np.array_equal(train, train_c) and np.array_equal(test, test_c)


def test_a_short_category_is_named_when_split_by_code() -> None:
    with pytest.raises(FedsimInputError, match="category 'b' has 1 records"):
        hold_out_test(np.array([0, 0, 1]), 1, rng(), ["a", "b"])
