"""Each strategy against numbers worked out by hand for three clients and two-element tensors.

Global adapter g = [1, 2]; the three clients send g + d_i with d_0 = [1, 0] (1 sample),
d_1 = [0, 2] (2 samples), d_2 = [3, -2] (1 sample), so the sample-weighted mean delta is
(d_0*1 + d_1*2 + d_2*1) / 4 = [1, 0.5] and the uniform one (d_0 + d_1 + d_2) / 3 = [4/3, 0].
"""

import typing

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedsim.config import ServerConfig, StrategyName
from fedsim.errors import FedsimInputError
from fedsim.server.aggregation import WeightedDeltaSum
from fedsim.server.strategies import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Scaffold,
    adaptive_step,
    make_strategy,
    scaffold_server_variate,
)
from tests.conftest import same_bits

G = {"w": torch.tensor([1.0, 2.0])}
DELTAS = [[1.0, 0.0], [0.0, 2.0], [3.0, -2.0]]
SAMPLES = [1, 2, 1]


def _round_mean(weights: list[int]) -> dict[str, torch.Tensor]:
    acc = WeightedDeltaSum(G, sum(weights))
    for d, n in zip(DELTAS, weights, strict=True):
        acc.add({"w": G["w"] + torch.tensor(d)}, n)
    return acc.mean()


def _values(adapter: dict[str, torch.Tensor]) -> list[float]:
    return adapter["w"].tolist()


def test_fedavg_sample_weighted_and_uniform():
    weighted = FedAvg().apply(G, _round_mean(SAMPLES))
    assert _values(weighted) == pytest.approx([1 + 1.0, 2 + 0.5])
    uniform = FedAvg().apply(G, _round_mean([1, 1, 1]))
    assert _values(uniform) == pytest.approx([1 + 4 / 3, 2 + 0.0])
    assert weighted["w"].dtype == torch.float32 and G["w"].tolist() == [1.0, 2.0]
    assert _values(FedAvg(lr=0.5).apply(G, _round_mean(SAMPLES))) == pytest.approx([1.5, 2.25])
    assert FedAvg().state_dict() == {}


def test_fedprox_averages_like_fedavg_and_asks_clients_for_the_proximal_term():
    strategy = FedProx(mu=0.25)
    assert _values(strategy.apply(G, _round_mean(SAMPLES))) == pytest.approx([2.0, 2.5])
    assert strategy.client_context(G, None).prox_mu == 0.25
    assert FedAvg().client_context(G, None).prox_mu == 0.0


def test_fedavgm_momentum_over_two_rounds():
    strategy = FedAvgM(lr=1.0, beta=0.9)
    mean = _round_mean(SAMPLES)  # [1, 0.5]
    g1 = strategy.apply(G, mean)  # m = [1, 0.5]
    assert _values(g1) == pytest.approx([2.0, 2.5])
    g2 = strategy.apply(g1, mean)  # m = 0.9*[1, 0.5] + [1, 0.5] = [1.9, 0.95]
    assert _values(g2) == pytest.approx([3.9, 3.45])
    assert strategy.state_dict()["momentum/w"].tolist() == pytest.approx([1.9, 0.95])
    half = FedAvgM(lr=0.5, beta=0.9)
    assert _values(half.apply(G, mean)) == pytest.approx([1.5, 2.25])


ROUND2 = {"w": torch.tensor([-1.0, 0.1], dtype=torch.float64)}


def test_fedadam_by_hand():
    strategy = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    g1 = strategy.apply(G, _round_mean(SAMPLES))
    # m = 0.1*[1, 0.5]; v = 0.01*[1, 0.25]; step = 0.1*m / (sqrt(v) + 1e-3)
    assert _values(g1) == pytest.approx([1 + 0.01 / 0.101, 2 + 0.005 / 0.051], rel=1e-6)
    strategy.apply(g1, ROUND2)
    # v = 0.99*[0.01, 0.0025] + 0.01*[1, 0.01]
    assert strategy.state["v"]["w"].tolist() == pytest.approx([0.0199, 0.002575])
    # m = 0.9*[0.1, 0.05] + 0.1*[-1, 0.1]
    assert strategy.state["m"]["w"].tolist() == pytest.approx([-0.01, 0.055])


def test_fedyogi_by_hand():
    strategy = FedYogi(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    g1 = strategy.apply(G, _round_mean(SAMPLES))
    # from v = 0: v = 0 - 0.01*d^2*sign(0 - d^2) = 0.01*d^2, the same first step as Adam
    assert _values(g1) == pytest.approx([1 + 0.01 / 0.101, 2 + 0.005 / 0.051], rel=1e-6)
    strategy.apply(g1, ROUND2)
    # v = v - 0.01*d^2*sign(v - d^2): [0.01 + 0.01*1, 0.0025 + 0.01*0.01]
    assert strategy.state["v"]["w"].tolist() == pytest.approx([0.02, 0.0026])


def test_fedadagrad_by_hand():
    strategy = FedAdagrad(lr=0.1, beta1=0.9, tau=1e-3)
    g1 = strategy.apply(G, _round_mean(SAMPLES))
    # v = d^2 = [1, 0.25]; step = 0.1*[0.1, 0.05] / ([1, 0.5] + 1e-3)
    assert _values(g1) == pytest.approx([1 + 0.01 / 1.001, 2 + 0.005 / 0.501], rel=1e-6)
    strategy.apply(g1, ROUND2)
    assert strategy.state["v"]["w"].tolist() == pytest.approx([2.0, 0.26])


def test_adaptive_step_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown"):
        adaptive_step("fedsgd", {}, {}, {"w": torch.zeros(1)}, 1.0, 0.9, 0.9, 1e-3)


def test_scaffold_server_round_with_three_clients():
    """Three of ten clients: c moves by (3/10) * mean(c_i+ - c_i); x by the mean delta."""
    assert scaffold_server_variate({}, {"w": torch.tensor([1.0, 1.0])}, 3, 10)["w"].tolist() == (
        pytest.approx([0.3, 0.3])
    )
    strategy = Scaffold(lr=1.0, num_clients=10)
    ctx = strategy.client_context(G, None)
    assert ctx.correction is not None and ctx.correction["w"].tolist() == [0.0, 0.0]
    strategy.begin_round(3)
    old = {"w": torch.tensor([1.0, 0.0])}
    strategy.fold_client_state(None, {"w": torch.tensor([1.0, 0.0])})  # first round: old = 0
    strategy.fold_client_state(old, {"w": torch.tensor([1.0, 1.0])})  # +[0, 1]
    strategy.fold_client_state(None, {"w": torch.tensor([2.0, 2.0])})
    new = strategy.apply(G, _round_mean(SAMPLES))
    assert _values(new) == pytest.approx([2.0, 2.5])
    # mean of [1, 0], [0, 1], [2, 2] is [1, 1]; c = 0.3 * [1, 1]
    assert strategy.state_dict()["c/w"].tolist() == pytest.approx([0.3, 0.3])
    # the next context of a client with c_i = [1, 0]: c - c_i
    assert strategy.client_context(G, old).correction["w"].tolist() == pytest.approx([-0.7, 0.3])


@pytest.mark.parametrize(
    # flexlora and flora take the clients' adapters (tests/server/test_lora_native_aggregation.py)
    "name",
    sorted(n for n, s in STRATEGIES.items() if not s.aggregates_products),
)
def test_state_survives_a_checkpoint_bitwise(name, tmp_path):
    """Two rounds, save the state as the checkpoint does, load it into a fresh strategy: the third
    round is bitwise the same as without the interruption."""
    server = ServerConfig(strategy=name)
    gen = torch.Generator().manual_seed(1)
    deltas = [{"w": torch.randn(5, generator=gen, dtype=torch.float64) * 0.1} for _ in range(3)]
    states = [{"w": torch.randn(5, generator=gen)} for _ in range(3)]

    def round_(strategy, g, r):
        strategy.begin_round(1)
        if strategy.uses_client_state:
            strategy.fold_client_state(None, states[r])
        return strategy.apply(g, deltas[r])

    g0 = {"w": torch.randn(5, generator=gen)}
    straight = make_strategy(name, server, num_clients=4)
    g = g0
    for r in range(3):
        g = round_(straight, g, r)

    first = make_strategy(name, server, num_clients=4)
    g2 = round_(first, round_(first, g0, 0), 1)
    state = first.state_dict()
    if state:
        save_file(state, str(tmp_path / "s.safetensors"))
        state = load_file(str(tmp_path / "s.safetensors"))
    resumed = make_strategy(name, server, num_clients=4)
    resumed.load_state_dict(state)
    assert same_bits(round_(resumed, g2, 2)["w"], g["w"])
    stateful = name not in ("fedavg", "fedprox", "ffa_lora", "fedsa_lora")
    assert bool(straight.state_dict()) == stateful


def test_make_strategy_reads_parameters_and_names_the_available_ones():
    adam = make_strategy("fedadam", ServerConfig(strategy="fedadam", beta2=0.5, tau=0.1))
    assert isinstance(adam, FedAdam) and (adam.lr, adam.beta2, adam.tau) == (0.01, 0.5, 0.1)
    prox = make_strategy("fedprox", ServerConfig(strategy="fedprox", prox_mu=0.3, lr=2.0))
    assert isinstance(prox, FedProx) and (prox.mu, prox.lr) == (0.3, 2.0)
    assert isinstance(make_strategy("fedavg"), FedAvg)
    with pytest.raises(FedsimInputError, match=r"server.strategy.*fedavg"):
        make_strategy("nope")


def test_stateless_strategy_refuses_state():
    with pytest.raises(ValueError, match="keeps no state"):
        FedAvg().load_state_dict({"m/w": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        FedAdam().load_state_dict({"momentum/w": torch.zeros(1)})


def test_the_registry_implements_exactly_the_config_choices():
    """server.strategy's Literal is the one list of names; every one has a class, and no class is
    registered under a name the config would refuse."""
    assert sorted(STRATEGIES) == sorted(typing.get_args(StrategyName))
    for name in typing.get_args(StrategyName):
        assert make_strategy(name).name == name
