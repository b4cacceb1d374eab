"""DP-FedAvg: noise scale measured statistically, epsilon checked against dp-accounting."""

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting import dp_event, rdp
from scipy.stats import norm

from fedsim.config import DPConfig, ExperimentConfig, ServerConfig
from fedsim.server.aggregator import Aggregator
from fedsim.server.privacy import dp_epsilon, gaussian_noise


def _dp_aggregator(tmp_path, num_clients=20, per_round=4, sigma=1.5, clip=0.5) -> Aggregator:
    cfg = ExperimentConfig(
        server=ServerConfig(
            clients_per_round=per_round,
            weighting="uniform",
            dp=DPConfig(enabled=True, clip_norm=clip, noise_multiplier=sigma, delta=1e-5),
        )
    )
    cfg.data.num_clients = num_clients
    agg = Aggregator(str(tmp_path), cfg, {}, {})
    agg.set_global({"w": torch.zeros(400, 500)})
    return agg


def test_noise_std_is_sigma_c_over_k(tmp_path):
    """Four clients send the global adapter back (delta 0): the new adapter is pure noise, whose
    sample std over 200,000 coordinates must be sigma*C/k = 1.5*0.5/4 within sampling error."""
    agg = _dp_aggregator(tmp_path)
    agg.begin_round({c: 10 for c in range(4)}, 1)
    for c in range(4):
        agg.fold(c, {"w": torch.zeros(400, 500)})
    _, new = agg.finish_round(1, {})
    x = new["w"].double().flatten()
    expected = 1.5 * 0.5 / 4
    n = x.numel()
    # the sample std of n normals has relative std ~ 1/sqrt(2n) = 0.16%: allow 5 of those
    assert float(x.std()) == pytest.approx(expected, rel=5 / math.sqrt(2 * n))
    assert abs(float(x.mean())) < 5 * expected / math.sqrt(n)
    # normality: the share beyond 2 std matches the Gaussian's 4.55%
    beyond = float((x.abs() > 2 * expected).double().mean())
    assert beyond == pytest.approx(2 * norm.sf(2), abs=0.003)


def test_updates_are_clipped_and_averaged_over_the_fixed_k(tmp_path):
    """One of four selected clients arrives with a long update: it is clipped to C, divided by
    k = 4 (not by the one that arrived), and the noise is what the round's seed gives."""
    agg = _dp_aggregator(tmp_path, sigma=1.0, clip=0.5)
    agg.begin_round({c: 10 for c in range(4)}, 3)
    update = torch.zeros(400, 500)
    update[0, 0] = 10.0  # norm 10 -> clipped to 0.5
    agg.fold(2, {"w": update})
    summary, new = agg.finish_round(3, {})
    noise = gaussian_noise({"w": torch.zeros(400, 500)}, 1.0 * 0.5 / 4, seed=0, round_idx=3)
    expected = noise["w"].clone()
    expected[0, 0] += 0.5 / 4
    torch.testing.assert_close(new["w"], expected.float(), rtol=0, atol=1e-7)
    assert summary["aggregation"]["update_norms"] == {"2": pytest.approx(10.0)}
    agg.flush()  # the checkpoint is written in the background
    info = json.loads((tmp_path / "rounds/round_0003/round.json").read_text())
    assert info["dp"]["epsilon"] == pytest.approx(dp_epsilon(1.0, 3, 1e-5, 20, 4))
    assert info["dp"]["sampling"] == "4 of 20 without replacement"


def test_epsilon_matches_the_library_for_a_known_setting():
    """100 rounds, 10 of 1,000 clients, sigma 1.2, delta 1e-5: fedsim's figure is the RDP
    accountant's for fixed-size sampling under replace-one (noise sigma/2 of sensitivity 2C)."""
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    accountant.compose(
        dp_event.SampledWithoutReplacementDpEvent(1000, 10, dp_event.GaussianDpEvent(0.6)), 100
    )
    expected = accountant.get_epsilon(1e-5)
    assert dp_epsilon(1.2, 100, 1e-5, 1000, 10) == pytest.approx(expected, rel=1e-12)
    assert 0 < expected < 50


def test_epsilon_of_one_full_gaussian_round_bounds_the_exact_one():
    """Every client every round, one round: the Gaussian mechanism with noise sigma/2 relative to
    its sensitivity. The exact epsilon (Balle & Wang 2018) is below the RDP conversion, which is
    tight to within a small factor."""
    sigma_eff, delta = 2.0, 1e-5

    def exact_delta(eps: float) -> float:
        return norm.cdf(0.5 / sigma_eff - eps * sigma_eff) - math.exp(eps) * norm.cdf(
            -0.5 / sigma_eff - eps * sigma_eff
        )

    lo, hi = 0.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if exact_delta(mid) > delta else (lo, mid)
    exact = hi
    reported = dp_epsilon(2 * sigma_eff, 1, delta, 10, None)
    assert exact < reported < 1.5 * exact


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    eps = [dp_epsilon(1.0, r, 1e-5, 100, 10) for r in (1, 10, 100)]
    assert eps[0] < eps[1] < eps[2]
    assert dp_epsilon(2.0, 10, 1e-5, 100, 10) < eps[1]
    # sampling 10 of 100 amplifies privacy compared with counting every round in full
    assert eps[1] < dp_epsilon(1.0, 10, 1e-5, 100, None)


def test_noise_is_a_function_of_seed_and_round():
    ref = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    one = gaussian_noise(ref, 1.0, 5, 2)
    assert all(torch.equal(one[k], gaussian_noise(ref, 1.0, 5, 2)[k]) for k in ref)
    assert not torch.equal(one["a"], gaussian_noise(ref, 1.0, 5, 3)["a"])


def test_dp_config_rules():
    from fedsim.config import config_from_dict
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"server.weighting: DP-FedAvg averages with fixed"):
        config_from_dict({"server": {"dp": {"enabled": True}}})
    with pytest.raises(ConfigError, match="scaffold"):
        config_from_dict(
            {"server": {"strategy": "scaffold", "weighting": "uniform", "dp": {"enabled": True}}}
        )
