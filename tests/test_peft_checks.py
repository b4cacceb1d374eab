"""The PEFT-load checks of tests/peft_checks.py catch what a tensor count cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from fedsim.config import LoraConfig
from fedsim.model import attach_lora, load_base_model
from tests.peft_checks import (
    assert_differs_from_a_fresh_adapter,
    assert_model_holds_the_file,
    lora_state,
    model_key,
    same_bits,
)

ADAPTER_FILE = "adapter_model.safetensors"


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """A one-layer LLaMA saved as safetensors: the base model a PEFT adapter names."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    path = tmp_path / "base"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def _trained_adapter_dir(base_dir: Path, out: Path) -> Path:
    """PEFT's own save of an adapter whose A and B are both away from their initial values."""
    model = attach_lora(load_base_model(str(base_dir)), LoraConfig(r=4, alpha=8), seed=1)
    with torch.no_grad():
        for p in lora_state(model).values():
            p.add_(0.25)
    model.save_pretrained(out)
    return out


def test_same_bits_tells_signed_zeros_and_dtypes_apart() -> None:
    zero, minus_zero = torch.tensor([0.0]), torch.tensor([-0.0])
    assert torch.equal(zero, minus_zero) and not same_bits(zero, minus_zero)
    assert not same_bits(torch.ones(2), torch.ones(2, dtype=torch.float64))
    assert not same_bits(torch.ones(2), torch.ones(1, 2))
    nan = torch.tensor([1.0, float("nan")])
    assert same_bits(nan, nan.clone()) and not torch.equal(nan, nan.clone())


def test_model_key_is_peft_s_mapping(base_dir: Path) -> None:
    model = attach_lora(load_base_model(str(base_dir)), LoraConfig(r=4, alpha=8), seed=1)
    file_keys = set(get_peft_model_state_dict(model))
    assert file_keys and {model_key(k) for k in file_keys} == set(lora_state(model))


def test_a_loaded_adapter_passes(base_dir: Path, tmp_path: Path) -> None:
    adapter_dir = _trained_adapter_dir(base_dir, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_base_model(str(base_dir)), adapter_dir)
    saved = assert_model_holds_the_file(loaded, adapter_dir / ADAPTER_FILE)
    assert_differs_from_a_fresh_adapter(saved, adapter_dir)


def test_a_load_that_kept_the_initial_weights_is_caught(base_dir: Path, tmp_path: Path) -> None:
    """Keys PEFT does not recognise: it keeps a fresh adapter (no error), which has as many LoRA
    tensors as the file, so only the values tell."""
    adapter_dir = _trained_adapter_dir(base_dir, tmp_path / "adapter")
    renamed = {f"x.{k}": v for k, v in load_file(adapter_dir / ADAPTER_FILE).items()}
    save_file(renamed, adapter_dir / ADAPTER_FILE, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(load_base_model(str(base_dir)), adapter_dir)
    assert len(lora_state(loaded)) == len(renamed)  # what the old count compared
    with pytest.raises(AssertionError):
        assert_model_holds_the_file(loaded, adapter_dir / ADAPTER_FILE)


def test_an_untrained_adapter_is_caught(base_dir: Path, tmp_path: Path) -> None:
    """A file holding a fresh adapter's zero B would match a load that kept its initial B."""
    model = attach_lora(load_base_model(str(base_dir)), LoraConfig(r=4, alpha=8), seed=1)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / ADAPTER_FILE)
    with pytest.raises(AssertionError, match=r"lora_B.*as freshly initialised"):
        assert_differs_from_a_fresh_adapter(saved, tmp_path / "adapter")
