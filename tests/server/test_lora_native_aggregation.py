"""LoRA-native aggregation against closed forms worked out by hand.

Two clients of one target matrix (out = in = 2):
  client 1: rank 1, A1 = [[1, 2]], B1 = [[1], [3]], weight p1 = 1/4, scaling s1 = 2
            p1 s1 B1 A1 = 0.5 * [[1, 2], [3, 6]] = [[0.5, 1], [1.5, 3]]
  client 2: rank 2, A2 = I, B2 = diag(2, 4), weight p2 = 3/4, scaling s2 = 1
            p2 s2 B2 A2 = [[1.5, 0], [0, 3]]
  sum_i p_i s_i B_i A_i = [[2, 1], [1.5, 6]].
Every value is a small dyadic rational, so float arithmetic is exact and equality is asserted
bit for bit; on random factors the sums run in another order and agree to 1e-12 (float64).
"""

import pytest
import ray
import torch
from safetensors.torch import load_file

from fedsim.config import DPConfig, ExperimentConfig, ServerConfig, config_from_dict
from fedsim.errors import ConfigError
from fedsim.protocol import ClientUpload
from fedsim.server.aggregator import Aggregator
from fedsim.server.lora_native import (
    ClientFactors,
    flexlora_factors,
    flexlora_round,
    flora_merged_delta,
    flora_stack,
    lora_pairs,
    split_lora,
    weighted_product,
)
from fedsim.server.strategies import FFALoRA, make_strategy
from tests.conftest import tiny_experiment

C1 = ClientFactors(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [3.0]]), 0.25, 2.0)
C2 = ClientFactors(torch.eye(2), torch.diag(torch.tensor([2.0, 4.0])), 0.75, 1.0)
EXPECTED = torch.tensor([[2.0, 1.0], [1.5, 6.0]], dtype=torch.float64)


def test_closed_form_by_hand():
    assert torch.equal(weighted_product([C1, C2]), EXPECTED)


def test_flora_stack_is_the_weighted_sum_of_products_exactly_for_mixed_ranks():
    a, b = flora_stack([C1, C2])
    # rank 1 + 2 = 3: A's rows scaled by p_i s_i, B's columns as they are
    assert torch.equal(a, torch.tensor([[0.5, 1.0], [0.75, 0.0], [0.0, 0.75]], dtype=a.dtype))
    assert torch.equal(b, torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 4.0]], dtype=b.dtype))
    assert torch.equal(b @ a, EXPECTED)
    assert torch.equal(flora_merged_delta([C1, C2]), EXPECTED)


def test_flora_stack_differs_from_averaging_factors():
    """The point of stacking: mean(B) @ mean(A) is another matrix (here with equal ranks)."""
    c2 = ClientFactors(torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0], [0.0]]), 0.75, 2.0)
    stacked = flora_merged_delta([C1, c2])
    mean_b = 0.25 * C1.b + 0.75 * c2.b
    mean_a = 0.25 * C1.a + 0.75 * c2.a
    assert not torch.allclose(stacked, 2.0 * (mean_b @ mean_a).double())


def test_flora_stack_on_random_factors_of_many_ranks():
    gen = torch.Generator().manual_seed(0)
    clients = [
        ClientFactors(torch.randn(r, 6, generator=gen), torch.randn(5, r, generator=gen), w, 16 / r)
        for r, w in ((1, 0.1), (4, 0.3), (8, 0.6))
    ]
    a, b = flora_stack(clients)
    assert a.shape == (13, 6) and b.shape == (5, 13)
    # float64 sums in another order: equal to rounding (1e-12 on values of order 10)
    torch.testing.assert_close(b @ a, weighted_product(clients), rtol=0, atol=1e-12)


# diag(3, 2, 1) with its singular vectors permuted: dW = [[3,0,0],[0,0,2],[0,1,0]]
DW = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.0, 0.0]], dtype=torch.float64)


def test_flexlora_factors_are_the_truncated_svd():
    a, b = flexlora_factors(DW, rank=2, scaling=2.0)
    assert a.shape == (2, 3) and b.shape == (3, 2)
    # the best rank-2 approximation keeps the singular values 3 and 2 (SVD in float64: 1e-12)
    best = torch.tensor([[3.0, 0, 0], [0, 0, 2.0], [0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(2.0 * b @ a, best, rtol=0, atol=1e-12)
    # sqrt(S/s) on both sides: column norms of B and row norms of A are sqrt(3/2), sqrt(2/2)
    expected = torch.tensor([1.5, 1.0], dtype=torch.float64).sqrt()
    torch.testing.assert_close(b.norm(dim=0), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.norm(dim=1), expected, rtol=0, atol=1e-12)


def test_flexlora_rank_above_the_matrix_rank_pads_zero_components():
    a, b = flexlora_factors(DW, rank=5)
    assert a.shape == (5, 3) and b.shape == (3, 5)
    assert torch.equal(a[3:], torch.zeros(2, 3, dtype=a.dtype))
    torch.testing.assert_close(b @ a, DW, rtol=0, atol=1e-12)


def test_flexlora_on_random_matrices_matches_eckart_young():
    gen = torch.Generator().manual_seed(1)
    dw = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(dw)
    for rank in (1, 3):
        a, b = flexlora_factors(dw, rank, scaling=0.5)
        err = (dw - 0.5 * b @ a).norm() ** 2
        torch.testing.assert_close(err, (s[rank:] ** 2).sum(), rtol=1e-10, atol=0)


def test_flexlora_round_hands_each_client_its_rank():
    # a rank-1 and a rank-2 client of the hand-worked pair: sum = [[2, 1], [1.5, 6]]
    factors = flexlora_round([C1, C2], ranks=[1, 2], scalings=[2.0, 1.0])
    (a1, b1), (a2, b2) = factors
    assert (a1.shape, b1.shape, a2.shape, b2.shape) == ((1, 2), (2, 1), (2, 2), (2, 2))
    torch.testing.assert_close(b2 @ a2, EXPECTED, rtol=0, atol=1e-12)  # full rank: the sum
    u, s, vh = torch.linalg.svd(EXPECTED)
    top = s[0] * torch.outer(u[:, 0], vh[0])
    torch.testing.assert_close(2.0 * b1 @ a1, top, rtol=0, atol=1e-12)


def test_flexlora_refuses_rank_zero():
    with pytest.raises(ValueError, match="rank"):
        flexlora_factors(DW, 0)


def test_ffa_average_of_b_with_a_shared_is_the_average_of_products():
    """FFA-LoRA: A frozen and shared, so sum p_i B_i @ A = (sum p_i B_i) @ A; exact here."""
    a = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    bs = [torch.tensor([[1.0, 0.0], [2.0, 1.0]]), torch.tensor([[0.0, 4.0], [-2.0, 0.5]])]
    weights = [0.25, 0.75]
    mean_of_products = sum(w * (b @ a) for w, b in zip(weights, bs, strict=True))
    product_of_mean = sum(w * b for w, b in zip(weights, bs, strict=True)) @ a
    assert torch.equal(mean_of_products, product_of_mean)


KEYS = {
    "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4),
    "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(4, 2),
    "base_model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.zeros(2, 4),
    "base_model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.zeros(4, 2),
}


def test_lora_pairs_and_split():
    pairs = lora_pairs(KEYS)
    assert list(pairs) == [
        "base_model.model.layers.0.self_attn.q_proj",
        "base_model.model.layers.0.self_attn.v_proj",
    ]
    assert pairs["base_model.model.layers.0.self_attn.v_proj"][1].endswith("v_proj.lora_B.weight")
    a, rest = split_lora(KEYS)
    assert sorted(a) == sorted(k for k in KEYS if "lora_A" in k)
    assert sorted(rest) == sorted(k for k in KEYS if "lora_B" in k)


# --- FFA-LoRA and FedSA-LoRA as strategies, and through the aggregator ----------------------

A_KEY, B_KEY = "m.lora_A.weight", "m.lora_B.weight"
G2 = {A_KEY: torch.tensor([[1.0, 2.0]]), B_KEY: torch.tensor([[0.0], [0.0]])}


def _adapter(a: list[float], b: list[float]) -> dict[str, torch.Tensor]:
    return {A_KEY: torch.tensor([a]), B_KEY: torch.tensor(b).reshape(2, 1)}


def test_ffa_lora_moves_b_and_never_a():
    strategy = make_strategy("ffa_lora")
    assert isinstance(strategy, FFALoRA) and strategy.client_context(G2, None).freeze_lora_a
    delta = {A_KEY: torch.tensor([[0.5, 0.5]], dtype=torch.float64), B_KEY: torch.ones(2, 1)}
    new = strategy.apply(G2, delta)
    assert new[A_KEY] is G2[A_KEY]  # bitwise the shared initial A
    assert torch.equal(new[B_KEY], torch.ones(2, 1))


def test_ffa_lora_with_dp_noise_leaves_a_exactly_at_its_initial_value(tmp_path):
    cfg = ExperimentConfig(
        server=ServerConfig(
            strategy="ffa_lora",
            clients_per_round=2,
            weighting="uniform",
            dp=DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=1.0),
        )
    )
    agg = Aggregator(str(tmp_path), cfg, {}, {})
    agg.set_global(G2)
    agg.begin_round({0: 5, 1: 7}, 1)
    agg.fold(0, _adapter([1.0, 2.0], [0.5, 0.0]))  # A as sent: untouched by the client
    agg.fold(1, _adapter([1.0, 2.0], [0.0, 0.5]))
    _, new = agg.finish_round(1, {})
    assert torch.equal(new[A_KEY], G2[A_KEY])
    assert not torch.equal(new[B_KEY], torch.tensor([[0.25], [0.25]]))  # B got its noise


def _fedsa(tmp_path) -> Aggregator:
    cfg = ExperimentConfig(server=ServerConfig(strategy="fedsa_lora", clients_per_round=2))
    agg = Aggregator(str(tmp_path), cfg, {}, {})
    agg.set_global(G2)
    return agg


def test_fedsa_lora_averages_a_and_b_and_keeps_each_clients_b(tmp_path):
    """Round 1: client 0 (1 sample) sends A=[2,2], B=[1,1]; client 1 (3 samples) A=[1,4],
    B=[3,-1]. Global A = (1*[2,2] + 3*[1,4])/4 = [1.25, 3.5]; global B (the average, for
    evaluation) = (1*[1,1] + 3*[3,-1])/4 = [2.5, -0.5]; each client keeps its own B."""
    agg = _fedsa(tmp_path)
    assert agg.client_context(0).start is None  # no B of its own yet: the global one
    agg.begin_round({0: 1, 1: 3}, 1)
    assert agg.fold(0, ClientUpload(_adapter([2.0, 2.0], [1.0, 1.0]))) is None
    assert agg.fold(1, ClientUpload(_adapter([1.0, 4.0], [3.0, -1.0]))) is None
    summary, new = agg.finish_round(1, {})
    assert torch.equal(new[A_KEY], torch.tensor([[1.25, 3.5]]))
    assert torch.equal(new[B_KEY], torch.tensor([[2.5], [-0.5]]))
    assert summary["checkpoints_written"][0]["client_states_written"] == 2
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == [
        "0.safetensors",
        "1.safetensors",
    ]
    start = agg.client_context(0).start
    assert start is not None and list(start) == [B_KEY]
    assert torch.equal(start[B_KEY], torch.tensor([[1.0], [1.0]]))
    assert agg.client_context(5).start is None

    # round 2: only client 1 trains; client 0's B stays as it was
    agg.begin_round({1: 3}, 2)
    agg.fold(1, ClientUpload(_adapter([1.0, 1.0], [4.0, 4.0])))
    _, new = agg.finish_round(2, {})
    assert torch.equal(new[B_KEY], torch.tensor([[4.0], [4.0]]))
    assert torch.equal(agg.client_context(0).start[B_KEY], torch.tensor([[1.0], [1.0]]))
    assert torch.equal(agg.client_context(1).start[B_KEY], torch.tensor([[4.0], [4.0]]))


def test_fedsa_lora_rejects_a_compressed_upload(tmp_path):
    agg = _fedsa(tmp_path)
    agg.begin_round({0: 1}, 1)
    delta = {k: torch.zeros_like(v, dtype=torch.float16) for k, v in G2.items()}
    why = agg.fold(0, ClientUpload(delta, "fp16"))
    assert why is not None and "fedsa_lora" in why


def test_fedsa_lora_context_pads_a_lower_rank_clients_b():
    g = {A_KEY: torch.zeros(3, 2), B_KEY: torch.zeros(2, 3)}
    kept = {B_KEY: torch.tensor([[1.0], [2.0]])}  # a rank-1 client's B
    start = make_strategy("fedsa_lora").client_context(g, kept).start
    assert start is not None
    assert torch.equal(start[B_KEY], torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"client": {"compression": {"kind": "int8"}}}, "client.compression.kind"),
        (
            {"server": {"weighting": "uniform", "dp": {"enabled": True}}},
            "server.strategy: fedsa_lora",
        ),
    ],
)
def test_fedsa_lora_config_constraints_name_the_field(tmp_path, section, field):
    raw = tiny_experiment(tmp_path, **section)
    raw["server"]["strategy"] = "fedsa_lora"
    with pytest.raises(ConfigError, match=field):
        config_from_dict(raw)
    config_from_dict(tiny_experiment(tmp_path, server={"strategy": "ffa_lora"}))


# --- FlexLoRA through the aggregator ---------------------------------------------------------


def test_flexlora_round_is_the_svd_of_the_mean_product_and_nested_by_rank(tmp_path):
    """Global rank 2. Client 0 (1 sample, rank 2): A = I, B = [[2,0],[0,0]], B A = [[2,0],[0,0]].
    Client 1 (3 samples, rank 1, uploads its one component): A = [[1,1]], B = [[0],[4]],
    B A = [[0,0],[4,4]]. Mean product = 0.25*[[2,0],[0,0]] + 0.75*[[0,0],[4,4]] = [[0.5,0],[3,3]]
    (rank 2, so the new global adapter stands for it exactly, up to the float32 cast)."""
    cfg = ExperimentConfig(server=ServerConfig(strategy="flexlora", clients_per_round=2))
    agg = Aggregator(str(tmp_path), cfg, {}, {})
    g = {A_KEY: torch.eye(2), B_KEY: torch.zeros(2, 2)}
    agg.set_global(g)
    agg.begin_round({0: 1, 1: 3}, 1)
    full = {A_KEY: torch.eye(2), B_KEY: torch.tensor([[2.0, 0.0], [0.0, 0.0]])}
    assert agg.fold(0, ClientUpload(full)) is None
    low = {A_KEY: torch.tensor([[1.0, 1.0]]), B_KEY: torch.tensor([[0.0], [4.0]])}
    assert agg.fold(1, ClientUpload(low, rank=1)) is None
    summary, new = agg.finish_round(1, {})
    assert not summary["aggregation"]["kept_previous_adapter"]
    assert summary["aggregation"]["ranks"] == {"0": 2, "1": 1}
    # bytes each client sent: the whole rank-2 adapter (8 floats), the rank-1 share (4 floats)
    assert summary["bytes"]["uplink_by_client"] == {"0": 32, "1": 16}
    assert new[A_KEY].dtype == torch.float32 and new[B_KEY].shape == (2, 2)
    mean = torch.tensor([[0.5, 0.0], [3.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close((new[B_KEY] @ new[A_KEY]).double(), mean, rtol=0, atol=1e-5)
    # a rank-1 client trains the first component: exactly the rank-1 truncated SVD
    u, s, vh = torch.linalg.svd(mean)
    top = s[0] * torch.outer(u[:, 0], vh[0])
    torch.testing.assert_close(
        (new[B_KEY][:, :1] @ new[A_KEY][:1]).double(), top, rtol=0, atol=1e-5
    )


def test_flexlora_config_constraints_name_the_field(tmp_path):
    for section, field in (
        ({"server": {"lr": 0.5}}, "server.lr: flexlora"),
        ({"server": {"robust": {"rule": "median"}}}, "server.robust: flexlora"),
    ):
        raw = tiny_experiment(tmp_path, **section)
        raw["server"]["strategy"] = "flexlora"
        with pytest.raises(ConfigError, match=field):
            config_from_dict(raw)


# --- FLoRA through the aggregator: stacking merged into the base, fresh factors --------------

FA, FB = "base_model.model.m.lora_A.weight", "base_model.model.m.lora_B.weight"


def _flora(tmp_path) -> Aggregator:
    """Default LoRA config: r 8, alpha 16, so every client's scaling s is 2."""
    cfg = ExperimentConfig(server=ServerConfig(strategy="flora", clients_per_round=2))
    agg = Aggregator(str(tmp_path), cfg, {}, {})
    agg.set_global({FA: torch.eye(2), FB: torch.zeros(2, 2)})
    return agg


def test_flora_merges_the_stacked_product_into_the_base_and_starts_fresh(tmp_path):
    """Round 1: client 0 (1 sample, rank 2) A = I, B = [[2,0],[0,0]]; client 1 (3 samples,
    rank 1) A = [[1,1]], B = [[0],[4]]. Merged: s * (0.25*[[2,0],[0,0]] + 0.75*[[0,0],[4,4]])
    = 2 * [[0.5,0],[3,3]] = [[1,0],[6,6]], exactly. Round 2: client 0 alone, A = I,
    B = 0.5 I: + 2 * 0.5 I = [[2,0],[6,7]]."""
    agg = _flora(tmp_path)
    assert agg.client_context(0).base_delta is None  # nothing merged before round 1
    agg.begin_round({0: 1, 1: 3}, 1)
    agg.fold(0, ClientUpload({FA: torch.eye(2), FB: torch.tensor([[2.0, 0.0], [0.0, 0.0]])}))
    low = {FA: torch.tensor([[1.0, 1.0]]), FB: torch.tensor([[0.0], [4.0]])}
    agg.fold(1, ClientUpload(low, rank=1))
    summary, fresh = agg.finish_round(1, {})
    agg.flush()  # the checkpoint is written in the background
    # the next round's clients download the stack: rank 2 + 1, a row of A and a column of B
    # (2 floats each) per rank
    assert summary["bytes"]["merged_stack"] == (2 + 1) * (2 + 2) * 4
    expected = torch.tensor([[1.0, 0.0], [6.0, 6.0]], dtype=torch.float64)
    state = load_file(str(tmp_path / "rounds/round_0001/server_state.safetensors"))
    assert list(state) == ["base_delta/m.weight"]
    assert torch.equal(state["base_delta/m.weight"], expected)
    # fresh factors: B zero (the adapter adds nothing yet), A drawn within PEFT's bound
    assert torch.equal(fresh[FB], torch.zeros(2, 2)) and fresh[FA].dtype == torch.float32
    assert 0 < float(fresh[FA].abs().max()) <= 2**-0.5
    again = _flora(tmp_path / "again")
    again.begin_round({0: 1}, 1)
    again.fold(0, ClientUpload({FA: torch.eye(2), FB: torch.zeros(2, 2)}))
    assert torch.equal(again.finish_round(1, {})[1][FA], fresh[FA])  # seeded by (seed, round)

    agg.begin_round({0: 1}, 2)
    ctx = agg.client_context(0)
    # an ObjectRef when Ray runs (put once per round), else the tensors themselves
    delta = ray.get(ctx.base_delta) if isinstance(ctx.base_delta, ray.ObjectRef) else ctx.base_delta
    assert ctx.base_version == 1 and torch.equal(delta["m.weight"], expected)
    agg.fold(0, ClientUpload({FA: torch.eye(2), FB: 0.5 * torch.eye(2)}))
    _, fresh2 = agg.finish_round(2, {})
    agg.flush()
    state = load_file(str(tmp_path / "rounds/round_0002/server_state.safetensors"))
    total = torch.tensor([[2.0, 0.0], [6.0, 7.0]], dtype=torch.float64)
    assert torch.equal(state["base_delta/m.weight"], total)
    assert not torch.equal(fresh2[FA], fresh[FA])


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"server": {"lr": 0.5}}, "server.lr: flora"),
        ({"server": {"weighting": "uniform", "dp": {"enabled": True}}}, "server.strategy: flora"),
        ({"eval": {"probe_per_category": 2}}, "eval.probe_per_category"),
    ],
)
def test_flora_config_constraints_name_the_field(tmp_path, section, field):
    raw = tiny_experiment(tmp_path, **section)
    raw["server"]["strategy"] = "flora"
    with pytest.raises(ConfigError, match=field):
        config_from_dict(raw)
