"""`client.deepspeed` at config load: one source of truth for what fedsim and DeepSpeed share,
DeepSpeed's own parser for the rest, every problem naming the DeepSpeed key."""

import json
from pathlib import Path

import pytest
import torch

from fedsim.client.deepspeed_trainer import build_deepspeed_config
from fedsim.client.trainer import TrainSettings
from fedsim.config import config_from_dict, load_config
from fedsim.errors import ConfigError

EXPERIMENTS = Path(__file__).parents[2] / "experiments"


def problems(deepspeed, **cluster) -> list[str]:
    raw = {
        "client": {"backend": "deepspeed", "batch_size": 8, "micro_batch_size": 2, **{}},
        "cluster": cluster,
    }
    raw["client"]["deepspeed"] = deepspeed
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return info.value.problems


@pytest.mark.parametrize(
    ("deepspeed", "key", "says"),
    [
        ({"train_batch_size": 16}, "train_batch_size", "client.batch_size (8)"),
        ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu", "(2)"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps", "(4)"),
        ({"gradient_clipping": 0.5}, "gradient_clipping", "client.max_grad_norm (1.0)"),
        ({"optimizer": {"type": "Adam"}}, "optimizer", "client.lr"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler", "client.lr_scheduler"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "0, 1 or 2"),
        (
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            "zero_optimization.offload_param",
            "stage 3",
        ),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            "zero_optimization.offload_optimizer",
            "stage 1 or 2",
        ),
        ({"bf16": {"enabled": True}}, "zero_optimization.stage", "ZeRO stage 1"),
        ({"bf16": {"enabled": "yes"}}, "zero_optimization.stage", "bf16 needs ZeRO stage 1"),
        ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, "fp16", "no fp16"),
        (
            {"zero_optimization": {"stage": 2, "overlap_com": True}},
            "zero_optimization.overlap_com",
            "Extra inputs",
        ),
        ("missing.json", "", "not found"),
        ([1, 2], "", "expected a mapping"),
    ],
)
def test_bad_deepspeed_settings_name_the_key(deepspeed, key, says):
    (problem,) = problems(deepspeed)
    assert problem.startswith(f"client.deepspeed{'.' + key if key else ''}:"), problem
    assert says in problem, problem


def test_matching_or_auto_values_are_accepted():
    cfg = config_from_dict(
        {
            "client": {
                "backend": "deepspeed",
                "batch_size": 8,
                "micro_batch_size": 2,
                "deepspeed": {
                    "train_batch_size": 8,
                    "train_micro_batch_size_per_gpu": "auto",
                    "gradient_accumulation_steps": 4,
                    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                    "bf16": {"enabled": True},
                },
            }
        }
    )
    built = build_deepspeed_config(TrainSettings(cfg.client))
    assert built["train_micro_batch_size_per_gpu"] == 2
    assert built["gradient_clipping"] == 1.0
    assert built["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


def test_a_deepspeed_json_file_is_read_and_recorded(tmp_path):
    ds = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"client:\n  backend: deepspeed\n  deepspeed: {tmp_path / 'ds.json'}\n")
    cfg = load_config(exp)
    assert cfg.client.deepspeed == ds  # config.yaml records the content, not the path
    (tmp_path / "ds.json").write_text("{ not json")
    with pytest.raises(ConfigError, match=r"client.deepspeed: .*ds.json:1: not valid JSON"):
        load_config(exp)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_base_fails_validation_without_cuda(monkeypatch, quantization):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError) as info:
        config_from_dict(
            {"model": {"quantization": quantization}, "cluster": {"gpus_per_worker": 1}}
        )
    assert info.value.problems == [
        f"model.quantization: {quantization} (bitsandbytes) needs a CUDA GPU and this machine "
        "has none; remove model.quantization, or run on a GPU cluster (cluster.address)"
    ]
    with pytest.raises(ConfigError, match=r"model.quantization: .* set cluster.gpus_per_worker"):
        config_from_dict({"model": {"quantization": quantization}})


def test_the_shipped_deepspeed_json_loads_with_the_quickstart():
    cfg = load_config(
        EXPERIMENTS / "quickstart.yaml",
        [
            "client.backend=deepspeed",
            f"client.deepspeed={EXPERIMENTS / 'deepspeed' / 'zero2_offload.json'}",
        ],
    )
    assert cfg.client.deepspeed["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg.client.deepspeed["train_batch_size"] == "auto"
