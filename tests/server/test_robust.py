"""Robust rules by hand, and an aggregator round where one client attacks."""

import json

import pytest
import torch

from fedsim.config import ExperimentConfig, RobustConfig, ServerConfig
from fedsim.server.aggregator import Aggregator
from fedsim.server.robust import (
    coordinate_median,
    krum,
    krum_scores,
    min_updates,
    trimmed_mean,
)
from tests.conftest import same_bits


def _d(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float64)}


def test_coordinate_median_odd_and_even():
    three = [_d(1, 30), _d(2, 10), _d(100, 20)]
    assert coordinate_median(three)["w"].tolist() == [2, 20]
    four = [*three, _d(3, -5)]
    assert coordinate_median(four)["w"].tolist() == [2.5, 15]


def test_trimmed_mean_drops_beta_n_at_each_end():
    four = [_d(1), _d(2), _d(3), _d(100)]
    assert trimmed_mean(four, 0.25)["w"].tolist() == [2.5]  # drops 1 and 100
    assert trimmed_mean(four, 0.2)["w"].tolist() == [26.5]  # floor(0.8) = 0: plain mean


def test_krum_scores_and_choice():
    deltas = [_d(0, 0), _d(1, 0), _d(0, 1), _d(10, 10)]
    # f = 0: each sums its n - f - 2 = 2 nearest squared distances
    assert krum_scores(deltas, 0) == pytest.approx([2.0, 3.0, 3.0, 181.0 + 181.0])
    mean, chosen = krum(deltas, 0)
    assert chosen == [0] and mean["w"].tolist() == [0, 0]
    mean, chosen = krum(deltas, 0, m=3)
    assert chosen == [0, 1, 2] and mean["w"].tolist() == pytest.approx([1 / 3, 1 / 3])


@pytest.mark.parametrize(
    ("rule", "f", "need"),
    [
        ("median", 1, 3),
        ("median", 2, 5),
        ("krum", 1, 5),
        ("multi_krum", 2, 7),
        ("trimmed_mean", 1, 10),
        ("mean", 3, 1),
    ],
)
def test_min_updates(rule, f, need):
    assert min_updates(rule, f, beta=0.1) == need


# ---------------------------------------------------------------------------------------------
# One attacker among five clients, through the real Aggregator (no Ray)
# ---------------------------------------------------------------------------------------------


def _aggregator(tmp_path, **robust) -> Aggregator:
    cfg = ExperimentConfig(
        server=ServerConfig(clients_per_round=5, weighting="uniform", robust=RobustConfig(**robust))
    )
    agg = Aggregator(str(tmp_path), cfg, {"r": 2}, {})
    agg.set_global({"w": torch.zeros(3, 4)})
    return agg


def _round(agg: Aggregator, attack: str, round_idx: int = 1) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(0)
    honest = torch.full((3, 4), 0.1)
    agg.begin_round({c: 10 for c in range(5)}, round_idx)
    for c in range(4):
        agg.fold(c, {"w": honest + 0.01 * torch.randn(3, 4, generator=gen)})
    bad = {"huge": honest * 1000, "sign_flip": -honest * 20}[attack]
    agg.fold(4, {"w": bad})
    summary, new = agg.finish_round(round_idx, {})
    return new["w"], summary


@pytest.mark.parametrize("attack", ["huge", "sign_flip"])
@pytest.mark.parametrize(
    "robust",
    [
        {"rule": "median"},
        {"rule": "trimmed_mean", "trim_beta": 0.2},
        {"rule": "krum"},
        {"rule": "multi_krum"},
        {"clip_norm": 0.5},
    ],
    ids=["median", "trimmed_mean", "krum", "multi_krum", "clip"],
)
def test_one_attacker_moves_the_adapter_far_less_than_with_fedavg(tmp_path, attack, robust):
    honest_target = torch.full((3, 4), 0.1)
    plain, _ = _round(_aggregator(tmp_path / "plain"), attack)
    defended, summary = _round(_aggregator(tmp_path / "robust", **robust), attack)
    plain_error = (plain - honest_target).norm()
    defended_error = (defended - honest_target).norm()
    assert defended_error < plain_error / 5, (float(defended_error), float(plain_error))
    if robust.get("rule") in ("krum", "multi_krum"):
        assert 4 not in summary["aggregation"]["robust"]["chosen"]
    if "clip_norm" in robust:
        assert summary["aggregation"]["update_norms"]["4"] > 0.5


def test_robust_rule_with_too_few_updates_keeps_the_previous_adapter(tmp_path):
    agg = _aggregator(tmp_path, rule="krum", num_byzantine=1)  # needs 5
    agg.begin_round({c: 10 for c in range(5)}, 1)
    for c in range(3):
        agg.fold(c, {"w": torch.full((3, 4), 0.1)})
    agg.fold(3, {"w": torch.full((3, 4), float("nan"))})
    _, new = agg.finish_round(1, {})
    assert same_bits(new["w"], torch.zeros(3, 4))
    agg.flush()  # the checkpoint is written in the background
    info = json.loads((tmp_path / "rounds/round_0001/round.json").read_text())
    assert info["aggregation"]["kept_previous_adapter"] is True
    assert (
        "krum needs at least 5 updates (num_byzantine=1), got 3"
        in (info["aggregation"]["robust_refused"])
    )
    assert info["aggregation"]["rejected"] == {"3": "w: non-finite values"}


def test_config_refuses_a_rule_the_round_cannot_feed():
    from fedsim.config import config_from_dict
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"server.robust.rule: krum .* needs at least 5"):
        config_from_dict({"server": {"clients_per_round": 4, "robust": {"rule": "krum"}}})
