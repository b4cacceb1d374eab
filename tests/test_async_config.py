"""`server.mode: async` in the config: what it needs, what it refuses (one line naming the field),
and that synchronous runs keep their training hash."""

import pytest

from fedsim.config import config_from_dict
from fedsim.errors import ConfigError

ASYNC = {
    "server": {"mode": "async", "concurrency": 4, "buffer_size": 2},
    "system": {"enabled": True, "speed_sigma": 1.0},
}


def merged(extra: dict) -> dict:
    raw = {section: dict(values) for section, values in ASYNC.items()}
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    return raw


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return info.value.problems


def test_an_async_config_loads_with_its_defaults():
    cfg = config_from_dict(merged({}))
    s = cfg.server
    assert (s.mode, s.concurrency, s.buffer_size) == ("async", 4, 2)
    assert (s.staleness.rule, s.staleness.a) == ("polynomial", 0.5)  # FedBuff's 1/sqrt(1 + s)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"system": {"enabled": False}}, "system.enabled: server.mode async runs on the simulated"),
        ({"server": {"concurrency": None}}, "server.concurrency: required"),
        ({"server": {"concurrency": 21}}, "server.concurrency: 21 is more than data.num_clients"),
        ({"server": {"concurrency": 0}}, "server.concurrency: expected a value > 0"),
        ({"server": {"buffer_size": 0}}, "server.buffer_size: expected a value > 0"),
        ({"server": {"staleness": {"a": -1}}}, "server.staleness.a: expected a value >= 0"),
        ({"server": {"staleness": {"rule": "linear"}}}, "server.staleness.rule: expected one of"),
        ({"server": {"strategy": "scaffold"}}, "server.strategy: scaffold cannot run async"),
        ({"server": {"strategy": "fedsa_lora"}}, "server.strategy: fedsa_lora cannot run async"),
        ({"server": {"strategy": "flexlora"}}, "server.strategy: flexlora cannot run async"),
        ({"server": {"strategy": "flora"}}, "server.strategy: flora cannot run async"),
        ({"server": {"robust": {"rule": "median"}}}, "server.robust.rule: median needs a whole"),
        (
            {"server": {"dp": {"enabled": True}, "weighting": "uniform"}},
            "server.dp.enabled: the accountant",
        ),
        ({"server": {"client_ids": [0, 1]}}, "server.client_ids: asynchronous training draws"),
        ({"server": {"selection": "round_robin"}}, "server.selection: asynchronous training"),
        ({"server": {"min_updates": 3}}, "server.min_updates: over-selection is for rounds"),
    ],
)
def test_what_async_cannot_do_is_refused_naming_the_field(extra, field):
    found = problems(merged(extra))
    assert any(p.startswith(field) for p in found), found


def test_clients_per_round_is_not_checked_against_the_clients_of_an_async_run():
    raw = merged({"data": {"num_clients": 3}, "server": {"concurrency": 3}})
    assert config_from_dict(raw).server.clients_per_round == 5  # default, unused


def test_concurrency_without_async_is_refused():
    (problem,) = problems({"server": {"concurrency": 4}})
    assert problem == "server.concurrency: only server.mode async reads it"


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm", "fedadam", "ffa_lora"])
def test_strategies_of_one_mean_delta_run_async(strategy):
    extra = {"server": {"strategy": strategy, "lr": 0.5}}
    assert config_from_dict(merged(extra)).server.strategy == strategy


def test_sync_runs_keep_their_training_hash():
    # The hashes of these two configs before server.mode existed (commit 2cd6f64): a run
    # written then still resumes.
    assert config_from_dict({}).training_hash() == (
        "feb4988cc7dcde163a94cbb24f8cdaaab560e810043b2d6d541aa71c6740f8b5"
    )
    system = {"system": {"enabled": True, "speed_sigma": 1.0}}
    assert config_from_dict(system).training_hash() == (
        "a3055445b84a16cc2a8f4b5632a2dfac10b1afb6d37ed57b9705f8f423cd1168"
    )


def test_the_async_settings_are_part_of_an_async_runs_training_hash():
    base = config_from_dict(merged({})).training_hash()
    assert base != config_from_dict({"system": ASYNC["system"]}).training_hash()
    for extra in ({"buffer_size": 3}, {"concurrency": 5}, {"staleness": {"rule": "constant"}}):
        assert config_from_dict(merged({"server": extra})).training_hash() != base
