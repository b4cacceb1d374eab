"""Checks that PEFT really loaded an adapter file: PEFT keeps a fresh LoRA initialisation, with
a warning at most, for every key of the file that does not match the model, so a matching tensor
count proves nothing."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from fedsim.model import load_base_model
from tests.conftest import same_bits


def model_key(file_key: str, adapter_name: str = "default") -> str:
    """PEFT's file key `...q_proj.lora_A.weight` is `...q_proj.lora_A.default.weight` in the
    model: the adapter's name follows the LoRA module's."""
    return re.sub(r"\.(lora_[A-Za-z_]+)\.", rf".\1.{adapter_name}.", file_key)


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def assert_model_holds_the_file(model: PeftModel, adapter_file: Path) -> dict[str, torch.Tensor]:
    """Every LoRA tensor of `model` is, bit for bit, the file's tensor under PEFT's key mapping,
    and the model has no LoRA tensor the file lacks. Returns the file's tensors."""
    saved = load_file(str(adapter_file))
    loaded = lora_state(model)
    assert saved, f"{adapter_file} holds no tensor"
    expected = {model_key(k) for k in saved}
    # (plain asserts in a helper module are not rewritten by pytest: the messages say what differs)
    assert set(loaded) == expected, f"keys only in one: {sorted(set(loaded) ^ expected)[:4]}"
    for key, value in saved.items():
        assert same_bits(loaded[model_key(key)], value), f"{key}: not the file's value"
    return saved


def assert_differs_from_a_fresh_adapter(saved: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """No tensor of `saved` equals its counterpart in a freshly initialised adapter of the same
    config, so a model holding `saved` cannot be one whose load silently kept its initial
    weights."""
    config = LoraConfig.from_pretrained(str(adapter_dir))
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(0)  # the fresh initialisation's A; any seed would do
        base = load_base_model(config.base_model_name_or_path)
        fresh = lora_state(get_peft_model(base, config))
    expected = {model_key(k) for k in saved}
    assert set(fresh) == expected, f"keys only in one: {sorted(set(fresh) ^ expected)[:4]}"
    for key, value in saved.items():
        assert not torch.equal(fresh[model_key(key)], value), f"{key}: as freshly initialised"
