"""Sizing and placing the worker pool: per node, fractional GPUs, impossible requests."""

import time

import pytest

from fedsim.config import ClusterConfig, config_from_dict
from fedsim.driver import run_experiment
from fedsim.errors import FedsimInputError
from fedsim.execution import pool_size
from tests.conftest import tiny_experiment

GPU_NODE = {"CPU": 8.0, "GPU": 1.0}


@pytest.mark.parametrize(
    ("cluster", "nodes", "expected"),
    [
        (ClusterConfig(cpus_per_worker=1), [{"CPU": 4.0}], 4),
        (ClusterConfig(cpus_per_worker=3), [{"CPU": 4.0}, {"CPU": 4.0}], 2),  # 1 per node, not 8/3
        (ClusterConfig(gpus_per_worker=1), [GPU_NODE, GPU_NODE], 2),
        (ClusterConfig(gpus_per_worker=0.5), [GPU_NODE, GPU_NODE], 4),  # two per GPU
        (ClusterConfig(gpus_per_worker=0.5, cpus_per_worker=4), [GPU_NODE], 2),
        (ClusterConfig(gpus_per_worker=1), [{"CPU": 16.0}, GPU_NODE], 1),  # CPU-only head
        (ClusterConfig(num_workers=3), [{"CPU": 4.0}], 3),
    ],
)
def test_pool_is_sized_per_node(cluster, nodes, expected):
    assert pool_size(cluster, nodes, per_round=100) == expected


def test_pool_is_never_larger_than_a_round():
    assert pool_size(ClusterConfig(), [{"CPU": 64.0}], per_round=5) == 5


def test_more_gpus_per_worker_than_any_node_has_is_an_error():
    with pytest.raises(FedsimInputError) as info:
        pool_size(ClusterConfig(gpus_per_worker=2), [GPU_NODE, GPU_NODE], per_round=4)
    message = str(info.value)
    assert message.startswith("cluster.gpus_per_worker: a worker needs 1 CPU and 2 GPU")
    assert "the largest has 1 GPU" in message and "2 node(s), 16 CPU, 2 GPU" in message


def test_too_many_workers_is_an_error():
    with pytest.raises(FedsimInputError, match=r"cluster.num_workers: 3 workers do not fit"):
        pool_size(ClusterConfig(num_workers=3, gpus_per_worker=1), [GPU_NODE, GPU_NODE], 4)


def test_fractional_gpus_above_one_must_be_whole():
    with pytest.raises(
        FedsimInputError, match=r"cluster.gpus_per_worker: above 1 it must be whole"
    ):
        config_from_dict({"cluster": {"gpus_per_worker": 1.5}})


@pytest.mark.ray
@pytest.mark.parametrize(
    ("cluster", "field"),
    [
        ({"gpus_per_worker": 1}, "cluster.gpus_per_worker"),
        ({"cpus_per_worker": 64}, "cluster.cpus_per_worker"),
        ({"num_workers": 5, "wait_for_nodes_s": 2}, "cluster"),
    ],
)
def test_an_impossible_pool_fails_fast_on_a_real_cluster(ray_local, tmp_path, cluster, field):
    """On the 2-CPU, GPU-less test cluster: a clear error within seconds, not a hang (the last
    case waits its 2 s for nodes that never come)."""
    cfg = config_from_dict(tiny_experiment(tmp_path, cluster=cluster))
    start = time.monotonic()
    with pytest.raises(FedsimInputError) as info:
        run_experiment(cfg, log=lambda _: None, show_progress=False)
    assert str(info.value).startswith(f"{field}:"), info.value
    assert time.monotonic() - start < 60
    deadline = time.monotonic() + 10  # a removed reservation is released asynchronously
    while ray_local.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_local.available_resources().get("CPU") == 2  # nothing left reserved
