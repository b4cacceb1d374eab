"""cluster.yaml is a valid Ray cluster-launcher file: checked with Ray's own schema, as `ray up`
checks it (defaults filled in by `prepare_config`, then `validate_config`)."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_FILE = Path(__file__).parents[1] / "cluster.yaml"


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_FILE.read_text())


def test_cluster_file_passes_rays_validation(cluster):
    validate_config(prepare_config(cluster))


def test_cluster_file_has_a_cpu_head_and_autoscaling_gpu_workers(cluster):
    nodes = cluster["available_node_types"]
    head = nodes[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no ClientWorker on the head
    (worker,) = (n for name, n in nodes.items() if name != cluster["head_node_type"])
    assert worker["min_workers"] < worker["max_workers"]
    assert worker["node_config"]["InstanceType"].startswith("g")  # an AWS GPU instance
    setup = "\n".join(cluster["setup_commands"])
    assert "fedsim[gpu]" in setup and "torch==2.13.0" in setup
    assert any("data" in target for target in cluster["file_mounts"])
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c for c in cluster[commands])


def test_rays_validation_rejects_a_misspelt_key(cluster):
    """The check above can fail: a typo in a node type is caught by the same validation."""
    worker = cluster["available_node_types"]["gpu_worker"]
    worker["min_wokers"] = worker.pop("min_workers")
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(cluster))
