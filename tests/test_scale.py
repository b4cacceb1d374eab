"""Scale to many registered clients (issue 6): 10,000 clients, a few sampled per round.

What grows with the registered clients must stay cheap: the partition (seconds), partition.json
(a few hundred bytes per client), the shard index (one offset per client) and the driver's
bookkeeping (one record count per client). Issue 16: at 100,000 clients the prepared data holds
arrays, not a Python object per client or per record, and partition.json is written in pieces.
The default tests need no Ray; the Ray round with 10,000 registered clients is in the slow tier.
"""

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import DataConfig, PartitionConfig, config_from_dict, load_config
from fedsim.data.partitioners import IID, ClientPositions, Dirichlet
from fedsim.data.pipeline import prepare_data, write_partition
from fedsim.data.shards import INDEX_FILE, ShardStore, write_shards
from fedsim.errors import FedsimInputError
from tests.conftest import tiny_experiment

EXPERIMENT = Path(__file__).parents[1] / "experiments" / "scalability.yaml"
CLIENTS = 10_000


@pytest.fixture(scope="module")
def prepared() -> tuple:
    cfg = load_config(EXPERIMENT)
    start = time.perf_counter()
    data = prepare_data(cfg.data, cfg.run.seed)
    return cfg, data, time.perf_counter() - start


def test_scalability_experiment_prepares_10k_clients_in_seconds(prepared: tuple) -> None:
    cfg, data, seconds = prepared

    assert cfg.data.num_clients == CLIENTS and cfg.server.clients_per_round == 10
    assert seconds < 30, f"preparing {CLIENTS} clients took {seconds:.1f} s"
    sizes = np.array([len(c) for c in data.clients])
    assert len(sizes) == CLIENTS
    assert sizes.min() >= cfg.data.partition.min_size >= 1
    # Every record is in exactly one client or the test split.
    everything = np.concatenate([*data.clients, data.test])
    assert len(everything) == data.table.num_rows == cfg.data.builtin_records
    assert np.array_equal(np.sort(everything), np.arange(data.table.num_rows))
    # Label skew survived: a client's main category is a larger share than under an iid split.
    categories = data.categories()
    iid = IID().split(categories, CLIENTS, np.random.default_rng(0))
    assert top_share(categories, data.clients) > top_share(categories, iid) + 0.1


def top_share(categories: np.ndarray, clients: list[np.ndarray]) -> float:
    """Mean share of its most frequent category over the first 500 clients."""
    return float(
        np.mean(
            [np.unique(categories[c], return_counts=True)[1].max() / len(c) for c in clients[:500]]
        )
    )


def test_partition_json_and_shard_index_grow_by_bytes_per_client(
    prepared: tuple, tmp_path: Path
) -> None:
    _, data, _ = prepared
    write_partition(tmp_path / "partition.json", data)
    summary = json.loads((tmp_path / "partition.json").read_text())
    assert summary["num_clients"] == CLIENTS and len(summary["clients"]) == CLIENTS
    assert (tmp_path / "partition.json").stat().st_size < 400 * CLIENTS

    # One Arrow file plus one offset per client, whatever the number of clients; fake token ids
    # (record position as its only token) keep tokenisation out of this test.
    n = data.table.num_rows
    ids = [[i, i] for i in range(n)]
    index = write_shards(tmp_path / "shards", data.clients, ids, ids)
    assert index.num_clients == CLIENTS
    assert (tmp_path / "shards" / INDEX_FILE).stat().st_size < 10 * CLIENTS
    store = ShardStore(tmp_path / "shards")
    last = store.client_examples(CLIENTS - 1)
    assert len(last) == len(data.clients[-1])
    assert [int(last[k][0][0]) for k in range(len(last))] == data.clients[-1].tolist()


def _tiny_clients(num_clients: int) -> DataConfig:
    """`num_clients` clients of 2 generated records each, an iid split, no test split."""
    return DataConfig(
        builtin_records=2 * num_clients,
        num_clients=num_clients,
        test_per_category=0,
        partition=PartitionConfig(kind="iid"),
    )


def _traced_peak_mb(step: object) -> float:
    """Peak Python and numpy memory (tracemalloc) while `step()` runs, in MiB."""
    tracemalloc.start()
    try:
        step()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_prepared_100k_clients_are_arrays_not_python_objects_per_client() -> None:
    prepare_data(_tiny_clients(10), seed=0)  # lazy imports happen outside the measurement
    cfg = _tiny_clients(100_000)
    prepare_data(cfg, seed=0)  # the generated records' cache file too
    holder: dict[str, object] = {}

    peak = _traced_peak_mb(lambda: holder.update(data=prepare_data(cfg, seed=0)))

    data = holder["data"]
    assert isinstance(data.clients, ClientPositions)
    assert data.clients.flat.dtype == np.int64 and len(data.clients.offsets) == 100_001
    # Two arrays of 200,000 and 100,001 int64 plus transients: ~5 MiB. A numpy array per client
    # (~13 MiB) or a Python string per record's category (~12 MiB) would not fit.
    assert peak < 12, f"preparing 100,000 clients traced {peak:.1f} MiB"


def test_partition_json_is_written_in_pieces(tmp_path: Path) -> None:
    data = prepare_data(_tiny_clients(20_000), seed=0)
    path = tmp_path / "partition.json"

    peak = _traced_peak_mb(lambda: write_partition(path, data))

    # The file is 2.6 MB; built as one dict (~30 MiB traced) it would not fit.
    assert peak < 8, f"writing partition.json of 20,000 clients traced {peak:.1f} MiB"
    summary = json.loads(path.read_text())
    assert len(summary["clients"]) == 20_000 and summary["clients"]["19999"]["records"] == 2


def test_impossible_dirichlet_split_at_10k_clients_is_a_quick_error() -> None:
    # Possible by count (2 records per client) but Dir(0.5) never gives every client two.
    categories = np.repeat(np.arange(8), 2_500).astype(str)
    start = time.perf_counter()
    with pytest.raises(FedsimInputError, match=r"could not reach min_size=2 for 10000 clients"):
        Dirichlet(alpha=0.5, min_size=2).split(categories, CLIENTS, np.random.default_rng(0))
    assert time.perf_counter() - start < 30


@pytest.mark.slow
@pytest.mark.ray
def test_one_ray_round_with_10k_registered_clients(tmp_path: Path, ray_local: None) -> None:
    from fedsim.driver import run_experiment

    # The Dolly-like case: an iid split leaves each of 10,000 clients 2 records.
    raw = tiny_experiment(
        tmp_path,
        run={"rounds": 1},
        data={"builtin_records": 2 * CLIENTS, "num_clients": CLIENTS, "partition": {"kind": "iid"}},
        server={"clients_per_round": 4},
    )
    result = run_experiment(config_from_dict(raw), log=lambda _: None, show_progress=False)

    (record,) = result.metrics
    assert record["num_clients"] == 4 and record["num_failed"] == 0
    assert record["samples"] == 8
    assert all(0 <= c < CLIENTS for c in record["clients"])
    assert 0 < record["checkpoint_seconds"] < record["seconds"]
    round_info = json.loads(
        next((result.run_dir / "rounds").glob("round_*/round.json")).read_text()
    )
    assert round_info["num_clients"] == 4
    assert len(json.loads((result.run_dir / "partition.json").read_text())["clients"]) == CLIENTS
