"""A run on a two-node Ray cluster started on this machine, the second node sharing no
filesystem with the driver: it cannot see the run directory, the shards or the tiny model (a
private mount namespace hides them), so its worker trains only on what reached it through the
object store. Checkpoints are written by the aggregator, on the driver's node."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray._private.authentication.authentication_token_generator import (
    generate_new_authentication_token,
)

from fedsim.checkpoint import verify_round
from fedsim.model_files import default_cache_dir
from tests.conftest import tiny_experiment
from tests.ray_cluster import LocalRayCluster, can_hide_paths, token_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def two_nodes(tmp_path):
    hidden = tmp_path / "driver-only"  # the run directory and the model cache live here
    hidden.mkdir()
    env = token_env(
        tmp_path / "home",
        generate_new_authentication_token(),
        FEDSIM_CACHE_DIR=str(hidden / "cache"),
        TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(default_cache_dir() / "torch_extensions")
        ),
    )
    cluster = LocalRayCluster(tmp_path, env)
    try:
        cluster.start_head(num_cpus=1, resources={"fedsim_head": 1}, dashboard=False)
        cluster.add_node("node2", 1, {"fedsim_node2": 1}, hide=hidden if can_hide_paths() else None)
        yield cluster, hidden
    finally:
        cluster.stop()


def _run(cluster, tmp_path, raw) -> subprocess.CompletedProcess:
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(raw))
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", str(config), "--overwrite"],
        env=cluster.env,  # no RAY_ADDRESS: the driver attaches through cluster.address
        capture_output=True,
        text=True,
        timeout=600,
    )


def _rounds(run_dir: Path) -> list[dict]:
    infos = []
    for r in (1, 2):
        round_dir = run_dir / "rounds" / f"round_{r:04d}"
        assert verify_round(round_dir) is None
        infos.append(json.loads((round_dir / "round.json").read_text()))
    return infos


def test_workers_on_both_nodes_train_and_the_head_checkpoints(two_nodes, tmp_path):
    cluster, hidden = two_nodes
    raw = tiny_experiment(
        hidden,
        client={"backend": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}},
        # Two workers of 1 CPU on two 1-CPU nodes: one on each. The wait covers the second
        # node's registration.
        cluster={
            "address": cluster.address,
            "num_workers": 2,
            "cpus_per_worker": 1,
            "wait_for_nodes_s": 60,
        },
    )
    done = _run(cluster, tmp_path, raw)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    nodes = {n["id"]: n["resources"] for n in cluster.nodes() if n["alive"]}
    by_resource = {r: nid for nid, res in nodes.items() for r in res if r.startswith("fedsim_")}
    assert set(by_resource) == {"fedsim_head", "fedsim_node2"}
    run_dir = Path(raw["run"]["output_dir"]) / "t"
    assert (run_dir / "latest").read_text().strip() == "round_0002"
    infos = _rounds(run_dir)
    assert all(info["num_failed"] == 0 for info in infos), infos
    trained_on = {c["node"] for info in infos for c in info["client_results"]}
    assert trained_on == {by_resource["fedsim_head"], by_resource["fedsim_node2"]}

    if not can_hide_paths():
        return
    # The control: told to read the shards from the run directory, the second node's worker
    # cannot (it does not see that filesystem) and its clients fail; the head's still train.
    raw["cluster"]["data_transport"] = "filesystem"
    done = _run(cluster, tmp_path, raw)
    if done.returncode != 0:  # the unreadable worker happened to be the one asked for set-up
        assert str(hidden) in done.stdout + done.stderr
        return
    failed = [c for info in _rounds(run_dir) for c in info["client_results"] if not c["ok"]]
    assert failed and all("worker failed" in c["error"] for c in failed)
    assert all(str(hidden) in c["error"] for c in failed)
