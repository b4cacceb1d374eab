"""experiments/async_vs_sync.py: its three runs are valid configs with equal client updates, and
the deadline sits at the 80th percentile of the clients' simulated round times."""

import importlib.util
import sys
from pathlib import Path

import pytest

from fedsim.config import config_from_dict
from fedsim.server.system_model import SystemModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "async_vs_sync", ROOT / "experiments/async_vs_sync.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("quick", [False, True])
def test_the_three_runs_apply_the_same_number_of_client_updates(script, quick, monkeypatch):
    monkeypatch.chdir(ROOT)  # the script reads experiments/quickstart.yaml
    scale = script.QUICK if quick else script.Scale()
    raw = script.base_config(scale, 1, [])
    runs = {m: config_from_dict(script.variant(raw, m, scale, 120.0)) for m in script.METHODS}

    sync, deadline, fedbuff = runs["sync"], runs["sync_deadline"], runs["fedbuff"]
    assert sync.data.num_clients == scale.clients and sync.run.seed == 1
    assert sync.system.enabled and sync.system.speed_sigma == 1.0 and sync.system.dropout == 0.05
    assert sync.server.mode == deadline.server.mode == "sync"
    assert deadline.system.deadline_seconds == 120.0
    assert deadline.server.min_updates == scale.per_round
    assert fedbuff.server.mode == "async" and fedbuff.server.concurrency == scale.concurrency
    updates = sync.run.rounds * sync.server.clients_per_round
    assert fedbuff.run.rounds * fedbuff.server.buffer_size == updates
    assert len({c.run.name for c in runs.values()}) == 3


def test_the_deadline_is_the_80th_percentile_of_client_round_times(script, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = script.base_config(script.QUICK, 0, [])
    deadline = script.deadline_seconds(raw, 65_536)
    cfg = config_from_dict(raw)
    system = SystemModel(cfg.system, 0)
    times = [system.client_seconds(c, 20, 65_536) for c in range(cfg.data.num_clients)]
    assert sum(t <= deadline for t in times) == 32  # 80 % of 40 clients make it
    assert sum(t < deadline for t in times) == 31
