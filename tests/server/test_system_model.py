"""Simulated system heterogeneity: profiles, dropouts and deadline stragglers from the seed."""

import json
from pathlib import Path

import pytest

from fedsim.config import SystemConfig, config_from_dict
from fedsim.data.profiles import ClientProfile
from fedsim.errors import ConfigError
from fedsim.server.selection import over_selection
from fedsim.server.system_model import DeviceProfile, SystemModel
from tests.conftest import tiny_experiment

SELECTED = list(range(0, 200, 4))


def ten_steps(client_id: int) -> int:
    return 10


MB = 1_000_000


def model(seed: int = 0, profiles: list[ClientProfile] | None = None, **settings: object):
    defaults = {"speed_sigma": 0.8, "dropout": 0.1, "deadline_seconds": 12.0}
    return SystemModel(SystemConfig(enabled=True, **(defaults | settings)), seed, profiles)


def test_same_seed_drops_the_same_clients() -> None:
    a = model(seed=1).plan_round(3, SELECTED, ten_steps, MB)
    b = model(seed=1).plan_round(3, SELECTED, ten_steps, MB)
    other = model(seed=2).plan_round(3, SELECTED, ten_steps, MB)

    assert a == b
    assert a.stragglers and a.dropped_out and a.kept  # the settings exercise all three
    assert (a.stragglers, a.dropped_out) != (other.stragglers, other.dropped_out)
    assert sorted(a.kept + a.stragglers + a.dropped_out) == SELECTED


def test_stragglers_are_the_clients_past_the_deadline() -> None:
    plan = model(dropout=0.0).plan_round(1, SELECTED, ten_steps, MB)

    assert not plan.dropped_out
    assert plan.stragglers and plan.kept  # so that the two checks below check something
    assert all(plan.client_seconds[c] > 12.0 for c in plan.stragglers)
    assert all(plan.client_seconds[c] <= 12.0 for c in plan.kept)
    # Someone was waited for until the deadline.
    assert plan.simulated_seconds == 12.0


def test_without_deadline_the_round_lasts_as_long_as_its_slowest_client() -> None:
    plan = model(dropout=0.0, deadline_seconds=None).plan_round(1, SELECTED, ten_steps, MB)

    assert plan.kept == SELECTED and not plan.stragglers
    assert plan.simulated_seconds == max(plan.client_seconds.values())


def test_client_time_is_compute_plus_adapter_transfer() -> None:
    m = model(speed_sigma=0.0, step_seconds=0.5, bandwidth_mbps=80.0)
    # 10 steps x 0.5 s, plus 1 MB down and up at 80 Mbit/s (0.1 s each way).
    assert m.client_seconds(7, 10, MB) == pytest.approx(5.0 + 0.2)


def test_client_profiles_override_the_drawn_devices_field_by_field() -> None:
    profiles = [ClientProfile()] * 10_000
    profiles[4] = ClientProfile(speed=0.01, bandwidth_mbps=1.0)  # dropout: drawn (0 here)
    profiles[8] = ClientProfile(dropout=1.0, lora_rank=2)  # speed and bandwidth: drawn
    m = model(dropout=0.0, profiles=profiles)
    drawn = model(dropout=0.0)

    assert m.profile(4) == DeviceProfile(0.01, 1.0, 0.0)
    assert m.profile(8) == DeviceProfile(
        drawn.profile(8).speed, drawn.profile(8).bandwidth_mbps, 1.0
    )
    assert m.profile(12) == drawn.profile(12)
    plan = m.plan_round(1, SELECTED, ten_steps, MB)
    assert 4 in plan.stragglers and 8 in plan.dropped_out


def test_a_clients_dropout_does_not_depend_on_who_else_was_sampled() -> None:
    m = model(dropout=0.5, deadline_seconds=None)
    together = m.plan_round(2, SELECTED, ten_steps, MB)
    alone = {c: m.plan_round(2, [c], ten_steps, MB).dropped_out == [c] for c in SELECTED}
    assert {c for c, out in alone.items() if out} == set(together.dropped_out)
    assert 0 < len(together.dropped_out) < len(SELECTED)


def test_over_selection_invites_more_clients_until_enough_report() -> None:
    m = model(seed=3)
    extras = over_selection(3, 1, 10_000, SELECTED)
    plan = m.plan_round(1, SELECTED, ten_steps, MB, extras, min_kept=len(SELECTED))

    assert len(plan.kept) == len(SELECTED)
    assert plan.over_selected and not set(plan.over_selected) & set(SELECTED)
    assert set(plan.kept) | set(plan.dropped_out) | set(plan.stragglers) == set(
        SELECTED + plan.over_selected
    )
    again = m.plan_round(1, SELECTED, ten_steps, MB, over_selection(3, 1, 10_000, SELECTED), 50)
    assert again == plan  # the same seed invites the same extra clients
    no_extras = m.plan_round(1, SELECTED, ten_steps, MB)
    assert len(no_extras.kept) < len(SELECTED) and not no_extras.over_selected


def test_min_updates_needs_the_system_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server.min_updates: over-selection .* system.enabled"):
        config_from_dict(tiny_experiment(tmp_path, server={"min_updates": 2}))


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

    profile = tmp_path / "profile.yaml"  # every device too slow for the deadline but 4 and 5
    profile.write_text(
        "default: {speed: 0.001, dropout: 0}\nclients: {4: {speed: 1}, 5: {speed: 1}}\n"
    )
    raw = tiny_experiment(
        tmp_path,
        run={"rounds": 1},
        client={"profile": str(profile)},
        server={"clients_per_round": 2, "min_updates": 2},
        system={"enabled": True, "deadline_seconds": 60.0},
    )
    result = run_experiment(config_from_dict(raw), log=lambda _: None, show_progress=False)

    (record,) = result.metrics
    assert record["clients"] == [4, 5]  # over-selection kept inviting until both fast ones came
    assert record["simulated_seconds"] == 60.0 and record["seconds"] > 0
    info = json.loads((result.run_dir / "rounds" / "round_0001" / "round.json").read_text())
    system = info["system"]
    assert system["kept"] == [4, 5] and not system["dropped_out"]
    invited = set(system["stragglers"]) | {4, 5}
    assert set(system["over_selected"]) <= invited
    assert len(invited - set(system["over_selected"])) == 2  # the round's own selection
    assert system["stragglers"]
    assert all(system["client_seconds"][str(c)] > 60.0 for c in system["stragglers"])
    assert info["simulated_seconds"] == 60.0
