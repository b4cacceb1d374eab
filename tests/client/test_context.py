"""What a ClientContext changes about local training, through every backend, on a small real
LLaMA model with LoRA: FedProx's proximal term, SCAFFOLD's correction, rank masks for
heterogeneous clients, FFA-LoRA's frozen A and FedSA-LoRA's own B."""

import pytest
import torch

from fedsim.client.context import frozen_lora_a, held, scaffold_client_variate, zero_gradients_of
from fedsim.lora_ranks import base_weight_name
from fedsim.model import MergedBase, adapter_parameters, get_adapter
from fedsim.protocol import ClientContext
from tests.client.conftest import settings
from tests.conftest import same_bits

SETTINGS = settings(local_steps=6, lr=5e-2, max_grad_norm=None)
EXAMPLES = [[(i * 7 + j) % 64 for j in range(12)] for i in range(8)]


@pytest.fixture(scope="module")
def model(tiny):
    return tiny(SETTINGS, vocab_size=64, lora_seed=1)


@pytest.fixture(scope="module")
def start(model):
    # LoRA B starts at zero; give it values so every component matters
    adapter = get_adapter(model.model)
    gen = torch.Generator().manual_seed(2)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in adapter.items()}


def _train(model, start, context=None):
    return model.train(start, EXAMPLES, EXAMPLES, seed=3, context=context)


def _distance(a, b) -> float:
    return sum(float((a[k] - b[k]).double().norm() ** 2) for k in a) ** 0.5


def test_adapter_parameters_use_peft_saved_names(model):
    assert set(adapter_parameters(model.model)) == set(get_adapter(model.model))


def test_no_context_and_an_empty_one_train_identically(model, start):
    plain, result = _train(model, start)
    empty, _ = _train(model, start, ClientContext())
    assert all(same_bits(plain[k], empty[k]) for k in plain)
    assert result.lr_sum == pytest.approx(6 * 5e-2)


def test_proximal_term_keeps_the_client_near_the_global_adapter(model, start):
    free, _ = _train(model, start)
    held, _ = _train(model, start, ClientContext(prox_mu=50.0))
    assert _distance(held, start) < 0.5 * _distance(free, start)


def test_scaffold_correction_is_a_decoupled_step(model, start):
    """A constant correction c moves each parameter by -sum(lr)*c on top of training."""
    free, _ = _train(model, start)
    correction = {k: torch.full(v.shape, 0.1) for k, v in start.items()}
    corrected, result = _train(model, start, ClientContext(correction=correction))
    shifted = {k: corrected[k] - free[k] for k in free}
    # not exactly -lr_sum * c: the correction also changes the path of AdamW's later steps
    for k, v in shifted.items():
        assert float(v.mean()) == pytest.approx(-result.lr_sum * 0.1, rel=0.35), k


def test_rank_mask_trains_only_the_first_components(model, start):
    trained, _ = _train(model, start, ClientContext(lora_rank=2))
    for key, value in trained.items():
        if "lora_A" in key:
            assert torch.all(value[2:] == 0) and not torch.equal(value[:2], start[key][:2])
        elif "lora_B" in key:
            assert torch.all(value[:, 2:] == 0) and not torch.equal(value[:, :2], start[key][:, :2])


def test_scaffold_client_variate_option_two():
    # c_i+ = c_i - c + (x - y) / (K*lr) with c - c_i = [0.5, -1], x - y = [0.2, -0.2], K*lr = 0.1
    new = scaffold_client_variate(
        {"w": torch.tensor([0.5, -1.0])},
        {"w": torch.tensor([1.0, 2.0])},
        {"w": torch.tensor([0.8, 2.2])},
        lr_sum=0.1,
    )
    assert new["w"].tolist() == pytest.approx([-0.5 + 2.0, 1.0 - 2.0])
    assert new["w"].dtype == torch.float32


def test_ffa_lora_keeps_a_bitwise_and_the_next_client_trains_it_again(model, start):
    """A comes back bit for bit as it went in, B moves; the frozen-A gradient hooks are gone
    for the worker's next client."""
    a_keys = [k for k in start if "lora_A" in k]
    assert a_keys and len(a_keys) < len(start)
    adapter, _ = _train(model, start, ClientContext(freeze_lora_a=True))
    for key, value in adapter.items():
        if key in a_keys:
            assert same_bits(value, start[key]), key
        else:
            assert not torch.equal(value, start[key]), key
    plain, _ = _train(model, start)
    assert all(not torch.equal(plain[k], start[k]) for k in a_keys)


def test_frozen_a_survives_adamw_weight_decay_and_adds_nothing_to_the_gradient():
    """Pure torch: a zero gradient alone would not hold A (AdamW's decoupled decay shrinks it);
    the hook zeroes A's gradient before clipping sees it, `held` puts the decayed value back."""
    params = {
        "m.lora_A.weight": torch.nn.Parameter(torch.tensor([[1.0, -2.0]])),
        "m.lora_B.weight": torch.nn.Parameter(torch.tensor([[0.5], [0.25]])),
    }
    anchors = frozen_lora_a(params)
    assert list(anchors) == ["m.lora_A.weight"]
    hooks = zero_gradients_of(params, list(anchors))
    opt = torch.optim.AdamW(list(params.values()), lr=0.1, weight_decay=0.5)
    x = torch.tensor([3.0, 1.0])
    (params["m.lora_B.weight"] @ (params["m.lora_A.weight"] @ x)).sum().backward()
    assert torch.equal(params["m.lora_A.weight"].grad, torch.zeros(1, 2))
    assert params["m.lora_B.weight"].grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(params["m.lora_A.weight"].detach(), anchors["m.lora_A.weight"])
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(held(anchors)(key, p.detach()))
    assert torch.equal(params["m.lora_A.weight"].detach(), torch.tensor([[1.0, -2.0]]))
    for hook in hooks:
        hook.remove()


def test_merged_base_is_w0_plus_delta_and_back_bitwise(model):
    """FLoRA's merge into the base weights: W0 + delta (float64 sum, cast), then W0 again."""
    peft_model = model.model
    key = next(k for k in get_adapter(peft_model) if "lora_A" in k)
    name = base_weight_name(key)
    module = peft_model.get_base_model().get_submodule(name.rpartition(".")[0])
    weight = module.get_base_layer().weight
    w0 = weight.detach().clone()
    delta = {name: torch.full(w0.shape, 0.25, dtype=torch.float64)}
    merged = MergedBase()
    merged.apply(peft_model, delta)
    assert torch.equal(weight.detach(), (w0.double() + 0.25).float())
    merged.apply(peft_model, delta)  # again: from W0, not on top of the first merge
    assert torch.equal(weight.detach(), (w0.double() + 0.25).float())
    merged.apply(peft_model, None)
    assert same_bits(weight.detach(), w0)
