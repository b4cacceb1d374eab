"""Ray token authentication stays on: the local instance fedsim starts requires a token, and a
cluster that answers without one is refused before anything is written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedsim import ray_auth
from fedsim.errors import FedsimInputError
from tests.conftest import tiny_experiment
from tests.ray_cluster import LocalRayCluster, token_env


@pytest.fixture(scope="module")
def open_cluster(tmp_path_factory):
    """A one-node Ray cluster started with token authentication off."""
    root = tmp_path_factory.mktemp("open")
    cluster = LocalRayCluster(root, token_env(root, None, RAY_AUTH_MODE="disabled"))
    cluster.start_head(1, {}, dashboard=False)
    yield cluster
    cluster.stop()


def test_the_probe_tells_an_open_cluster_from_an_unreachable_one(open_cluster):
    # (one that wants a token: the last test, on the instance fedsim starts)
    assert ray_auth.unauthenticated_access(open_cluster.address) == ray_auth.ANSWERS
    assert ray_auth.unauthenticated_access("127.0.0.1:1") == ray_auth.UNKNOWN


def test_attaching_to_an_open_cluster_exits_2_and_writes_nothing(open_cluster, tmp_path):
    config = tmp_path / "experiment.yaml"
    raw = tiny_experiment(tmp_path, cluster={"address": open_cluster.address})
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", str(config)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"fedsim: error: cluster.address: the Ray cluster at "
                           f"{open_cluster.address} accepts requests without a token")  # fmt: skip
    assert "cluster.allow_unauthenticated: true" in line  # how to opt out knowingly
    assert not (tmp_path / "runs").exists()


def test_opting_out_knowingly_is_allowed(open_cluster):
    ray_auth.check_cluster(open_cluster.address, allow_unauthenticated=True)
    with pytest.raises(FedsimInputError):
        ray_auth.check_cluster(open_cluster.address, allow_unauthenticated=False)


_START_LOCAL = """
import ray
from fedsim.config import ClusterConfig
from fedsim.execution import ray_session
from fedsim.ray_auth import unauthenticated_access
with ray_session(ClusterConfig()):
    print(unauthenticated_access(ray.get_runtime_context().gcs_address))
"""


def test_the_local_instance_fedsim_starts_requires_a_token(tmp_path: Path):
    # Even with token auth switched off in the user's environment.
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-c", _START_LOCAL],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == ray_auth.REFUSES
