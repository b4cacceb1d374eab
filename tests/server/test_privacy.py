"""DP-FedAvg: noise scale measured statistically, epsilon checked against its formulas."""

import json
import math

import pytest
import torch
from mpmath import exp, log, mpf, sqrt, workdps
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
    assert info["dp"]["epsilon"] == pytest.approx(15.167914590830538, rel=1e-12)  # as pinned below
    assert info["dp"]["sampling"] == "4 of 20 without replacement"


# --- epsilon, computed without dp-accounting -----------------------------------------------------
#
# fedsim reports dp-accounting's RDP figure for k of N clients sampled without replacement under
# the replace-one relation (so Mironov et al.'s Poisson-sampling formula does not apply; the bound
# for this sampling is Wang, Balle & Kasiviswanathan 2019, "Subsampled Renyi DP and analytical
# moments accountant", WBK19), with noise multiplier s = sigma/2 relative to the sensitivity 2C.
# The functions below compute that figure from the papers' formulas in 100-digit arithmetic.

RDP_ORDERS = (*(1 + x / 10.0 for x in range(1, 100)), *range(11, 64), 128, 256, 512, 1024)
"""The orders the accountant evaluates (dp-accounting's DEFAULT_RDP_ORDERS, copied): epsilon is
the best conversion over them, so a figure computed on other orders would differ slightly."""
EXACT_UP_TO = 256
"""Above this order the forward-difference terms are skipped (as dp-accounting does: they cost
O(order^2)); the remaining terms are WBK19's Theorem 9, still a valid bound."""


def _gaussian_moments(s: mpf, count: int) -> list[mpf]:
    """E_Q[(P/Q)^k] = exp(k(k-1)/(2 s^2)), k = 0..count-1, for two Gaussians 1/s apart."""
    return [exp(mpf(k * (k - 1)) / (2 * s * s)) for k in range(count)]


def _forward_differences(moments: list[mpf], count: int) -> list[mpf]:
    """Delta^j of the moments at 0, which is E_Q[(P/Q - 1)^j], for j = 0..count-1."""
    return [
        sum((-1) ** (j - k) * math.comb(j, k) * moments[k] for k in range(j + 1))
        for j in range(count)
    ]


def _log_a(q: mpf, alpha: int, moments: list[mpf], diffs: list[mpf]) -> mpf:
    """(alpha-1) times the RDP at integer `alpha` >= 2 of one sampled round: WBK19 Theorem 9 with
    the Gaussian's tighter j-th terms (their Theorem 27: 4 E|P/Q-1|^j, bounded by Cauchy-Schwarz
    between the two even differences around j)."""
    total = 1 + q**2 * math.comb(alpha, 2) * min(4 * (moments[2] - 1), 2 * moments[2])
    for j in range(3, alpha + 1):
        term = 2 * moments[j]
        if alpha <= EXACT_UP_TO:
            lo, hi = diffs[2 * (j // 2)], diffs[2 * ((j + 1) // 2)]
            term = min(4 * sqrt(abs(lo) * abs(hi)), term)
        total += q**j * math.comb(alpha, j) * term
    return log(total)


def _sampled_rdp(q: mpf, s: mpf) -> dict[float, mpf]:
    """RDP of one round at each order. At a fractional order, (alpha-1)*RDP is interpolated
    linearly between the integers around it: an upper bound, as it is convex (WBK19 Cor. 10)."""
    moments = _gaussian_moments(s, 1025)
    diffs = _forward_differences(moments, EXACT_UP_TO + 1)
    log_a = {1: mpf(0)}
    for alpha in {math.ceil(a) for a in RDP_ORDERS} - {1}:
        log_a[alpha] = _log_a(q, alpha, moments, diffs)
    rdp = {}
    for order in RDP_ORDERS:
        t = mpf(order) - math.floor(order)
        low, high = log_a[math.floor(order)], log_a[math.ceil(order)]
        rdp[order] = ((1 - t) * low + t * high) / (mpf(order) - 1)
    return rdp


def _best_epsilon(rdp: dict[float, mpf], delta: float) -> mpf:
    """RDP to (epsilon, delta)-DP by the improved conversion dp-accounting uses (Canonne, Kamath &
    Steinke 2020, Prop. 12): epsilon = rdp + log(1 - 1/a) - log(delta * a)/(a - 1), best order."""
    return min(r + log(1 - 1 / mpf(a)) - log(mpf(delta) * a) / (mpf(a) - 1) for a, r in rdp.items())


def independent_epsilon(
    sigma: float, rounds: int, delta: float, num_clients: int, per_round: int | None
) -> float:
    """dp_epsilon's figure, from the formulas alone."""
    with workdps(100):
        s = mpf(sigma) / 2  # replace-one: the sum moves by up to 2C
        if per_round is None or per_round == num_clients:
            # the Gaussian mechanism's RDP, alpha / (2 s^2) per round, in closed form
            rdp = {a: rounds * mpf(a) / (2 * s * s) for a in RDP_ORDERS}
        else:
            one = _sampled_rdp(mpf(per_round) / num_clients, s)
            rdp = {a: rounds * r for a, r in one.items()}
        return float(_best_epsilon(rdp, delta))


PINNED_EPSILONS = [
    # (sigma, rounds, delta, num_clients, per_round, epsilon): each epsilon is
    # independent_epsilon's value at 100 digits (best orders 3.0, 2.0, 7.0, 3.9 and 3.0),
    # rounded to 17 significant digits.
    (1.2, 100, 1e-5, 1000, 10, 5.6922368945946395),
    (1.0, 3, 1e-5, 20, 4, 15.167914590830538),
    (4.0, 50, 1e-6, 100, 10, 4.1009559661059464),
    (4.0, 10, 1e-5, 10, None, 8.0794062224204923),  # q = 1: every client every round
    (2.0, 5, 1e-5, 10, 10, 12.301691480042895),  # q = 1 again: all 10 of 10 selected
]


@pytest.mark.parametrize(
    ("sigma", "rounds", "delta", "num_clients", "per_round", "expected"), PINNED_EPSILONS
)
def test_epsilon_matches_the_formulas(sigma, rounds, delta, num_clients, per_round, expected):
    """fedsim's epsilon equals the pinned figure, and the formulas still give that figure."""
    reported = dp_epsilon(sigma, rounds, delta, num_clients, per_round)
    assert reported == pytest.approx(expected, rel=1e-12)
    assert independent_epsilon(sigma, rounds, delta, num_clients, per_round) == pytest.approx(
        expected, rel=1e-15
    )


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
