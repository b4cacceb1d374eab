"""Simulated system heterogeneity: profiles, dropouts and deadline stragglers from the seed."""

import json
from pathlib import Path

import pytest

from fedsim.config import config_from_dict
from fedsim.errors import ConfigError, FedsimInputError
from fedsim.server.system_model import ClientProfile, SystemModel, SystemSettings
from tests.conftest import tiny_experiment

SELECTED = list(range(0, 200, 4))
STEPS = dict.fromkeys(SELECTED, 10)
MB = 1_000_000


def model(seed: int = 0, **settings: object) -> SystemModel:
    defaults = {"speed_sigma": 0.8, "dropout": 0.1, "deadline_seconds": 12.0}
    return SystemModel(SystemSettings(**(defaults | settings)), seed, num_clients=10_000)


def test_same_seed_drops_the_same_clients() -> None:
    a = model(seed=1).plan_round(3, SELECTED, STEPS, MB)
    b = model(seed=1).plan_round(3, SELECTED, STEPS, MB)
    other = model(seed=2).plan_round(3, SELECTED, STEPS, MB)

    assert a == b
    assert a.stragglers and a.dropped_out and a.kept  # the settings exercise all three
    assert (a.stragglers, a.dropped_out) != (other.stragglers, other.dropped_out)
    assert sorted(a.kept + a.stragglers + a.dropped_out) == SELECTED


def test_stragglers_are_the_clients_past_the_deadline() -> None:
    plan = model(dropout=0.0).plan_round(1, SELECTED, STEPS, MB)

    assert not plan.dropped_out
    assert all(plan.client_seconds[c] > 12.0 for c in plan.stragglers)
    assert all(plan.client_seconds[c] <= 12.0 for c in plan.kept)
    # Someone was waited for until the deadline.
    assert plan.simulated_seconds == 12.0


def test_without_deadline_the_round_lasts_as_long_as_its_slowest_client() -> None:
    plan = model(dropout=0.0, deadline_seconds=None).plan_round(1, SELECTED, STEPS, MB)

    assert plan.kept == SELECTED and not plan.stragglers
    assert plan.simulated_seconds == max(plan.client_seconds.values())


def test_client_time_is_compute_plus_adapter_transfer() -> None:
    m = model(speed_sigma=0.0, step_seconds=0.5, bandwidth_mbps=80.0)
    # 10 steps x 0.5 s, plus 1 MB down and up at 80 Mbit/s (0.1 s each way).
    assert m.client_seconds(7, 10, MB) == pytest.approx(5.0 + 0.2)


def test_profiles_file_overrides_listed_clients(tmp_path: Path) -> None:
    path = tmp_path / "profiles.json"
    slow = {"speed": 0.01, "bandwidth_mbps": 1.0, "dropout": 0.0}
    path.write_text(json.dumps({"clients": {"4": slow}}))
    m = model(profiles=str(path), dropout=0.0)

    assert m.profile(4) == ClientProfile(0.01, 1.0, 0.0)
    assert m.profile(8) != m.profile(4)
    assert 4 in m.plan_round(1, SELECTED, STEPS, MB).stragglers


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"clients": [1]}', r'expected an object with a "clients" object'),
        ('{"clients": {"10000": {}}}', r"client '10000' is not an id in 0\.\.9999"),
        ('{"clients": {"1": {"speed": 1}}}', r"client 1 needs exactly speed, bandwidth_mbps"),
        (
            '{"clients": {"1": {"speed": 0, "bandwidth_mbps": 1, "dropout": 0}}}',
            r"client 1: speed and bandwidth_mbps must be > 0",
        ),
        ("{oops", r"profiles\.json:1: not valid JSON"),
    ],
)
def test_bad_profiles_file_names_file_and_client(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "profiles.json"
    path.write_text(content)
    with pytest.raises(FedsimInputError, match=message):
        model(profiles=str(path))


def test_config_validates_system_section(tmp_path: Path) -> None:
    raw = tiny_experiment(tmp_path, system={"enabled": True, "dropout": 1.5, "step_seconds": 0})
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert "system.dropout: must be in [0, 1], got 1.5" in str(err.value)
    assert "system.step_seconds: expected a value > 0" in str(err.value)


def test_system_off_leaves_the_training_hash_alone(tmp_path: Path) -> None:
    off = config_from_dict(tiny_experiment(tmp_path))
    still_off = config_from_dict(tiny_experiment(tmp_path, system={"dropout": 0.5}))
    on = config_from_dict(tiny_experiment(tmp_path, system={"enabled": True}))

    assert off.training_hash() == still_off.training_hash() != on.training_hash()


@pytest.mark.ray
def test_driver_trains_only_the_clients_that_make_the_deadline(
    tmp_path: Path, ray_local: None
) -> None:
    from fedsim.driver import run_experiment

    profiles = tmp_path / "profiles.json"
    slow = {"speed": 0.001, "bandwidth_mbps": 100.0, "dropout": 0.0}
    profiles.write_text(json.dumps({"clients": {"1": slow}}))
    raw = tiny_experiment(
        tmp_path,
        run={"rounds": 1},
        server={"client_ids": [0, 1, 2]},
        system={"enabled": True, "deadline_seconds": 60.0, "profiles": str(profiles)},
    )
    result = run_experiment(config_from_dict(raw), log=lambda _: None, show_progress=False)

    (record,) = result.metrics
    assert record["clients"] == [0, 2]
    assert record["simulated_seconds"] == 60.0 and record["seconds"] > 0
    info = json.loads((result.run_dir / "rounds" / "round_0001" / "round.json").read_text())
    assert info["system"]["stragglers"] == [1] and info["system"]["kept"] == [0, 2]
    assert info["system"]["client_seconds"]["1"] > 60.0 >= info["system"]["client_seconds"]["0"]
    assert info["simulated_seconds"] == 60.0
