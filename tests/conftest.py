"""Fixtures shared by every test package."""

import os
from collections.abc import Iterable
from pathlib import Path

import pytest


def tiny_lora_llama(vocab_size: int, lora_seed: int):
    """A one-layer LLaMA (hidden size 16, weights from torch seed 0) with LoRA r=4 on its
    attention: a real causal LM built in milliseconds, for trainer tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedsim.config import LoraConfig
    from fedsim.model import attach_lora

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return attach_lora(LlamaForCausalLM(config), LoraConfig(r=4, alpha=8, dropout=0.0), lora_seed)


def same_bits(a, b) -> bool:
    """Equal dtype, shape and bytes: unlike torch.equal, -0.0 differs from +0.0 and NaN matches
    the same NaN. For claims that no bit changed."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return torch.equal(*as_bytes)


def assert_same_run_files(a: Path, b: Path, rounds: Iterable[int]) -> None:
    """Run directories `a` and `b` hold byte-identical checkpoints for `rounds` and identical
    client-state files. Bytes, not tensor equality: -0.0 and +0.0 differ, and so would a header
    written in another order. Every file must exist on both sides (round.json's `files` lists what
    a round wrote); round.json itself differs only in timings, so its `files` and `clients`
    entries are compared instead."""
    import json

    for r in rounds:
        ra, rb = a / "rounds" / f"round_{r:04d}", b / "rounds" / f"round_{r:04d}"
        info_a, info_b = (json.loads((d / "round.json").read_text()) for d in (ra, rb))
        assert info_a["files"] == info_b["files"], f"round {r}: {info_a['files']}"
        assert "adapter_model.safetensors" in info_a["files"]
        assert info_a.get("clients") == info_b.get("clients"), f"round {r}"
        assert sorted(p.name for p in ra.iterdir()) == sorted(p.name for p in rb.iterdir())
        for name in info_a["files"]:
            assert (ra / name).read_bytes() == (rb / name).read_bytes(), f"round {r}: {name}"
    clients_a = sorted(p.name for p in (a / "clients").glob("*"))  # glob of a missing dir: []
    clients_b = sorted(p.name for p in (b / "clients").glob("*"))
    assert clients_a == clients_b
    for name in clients_a:
        assert (a / "clients" / name).read_bytes() == (b / "clients" / name).read_bytes(), name


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Shared data folder (Dolly and its reference split): `FEDSIM_DATA_DIR`, or ../shared/data
    next to the repository. Tests that need a file in it skip themselves when it is absent."""
    return Path(
        os.environ.get("FEDSIM_DATA_DIR") or Path(__file__).parents[1].parent / "shared" / "data"
    )


@pytest.fixture(scope="session", autouse=True)
def fedsim_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny test models once per test session, away from the user's cache (unless
    FEDSIM_CACHE_DIR is set, as `make test` does, to reuse them between sessions); DeepSpeed's
    compiled ops are kept across sessions."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        # DeepSpeed's JIT-compiled ops take minutes to build: cache them per machine (where the
        # Makefile puts them too), not per test session.
        os.environ["TORCH_EXTENSIONS_DIR"] = str(
            Path.home() / ".cache" / "fedsim" / "torch_extensions"
        )
    if "FEDSIM_CACHE_DIR" not in os.environ:
        os.environ["FEDSIM_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedsim-cache"))
    return Path(os.environ["FEDSIM_CACHE_DIR"])


def tiny_experiment(tmp_path: Path, **sections: dict) -> dict:
    """A complete raw config for a seconds-long run: a very small built-in model, 400 generated
    records over 6 clients, 3 per round, 3 local steps. Pass sections to override keys."""
    raw = {
        "run": {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 7, "rounds": 2},
        "data": {
            "source": "builtin:quickstart",
            "builtin_records": 400,
            "cutoff_len": 160,
            "num_clients": 6,
            "partition": {"kind": "dirichlet", "alpha": 1.0, "min_size": 10},
        },
        "model": {
            "name_or_path": "tiny",
            "tiny": {
                "vocab_size": 512,
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_size": 64,
                "pretrain_steps": 30,
            },
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        },
        "client": {"local_steps": 3, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2},
        "server": {"clients_per_round": 3},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture
def experiment_file(tmp_path: Path):
    """Write `tiny_experiment(...)` to a YAML file and return its path."""
    import yaml

    def write(**sections: dict) -> Path:
        path = tmp_path / "experiment.yaml"
        path.write_text(yaml.safe_dump(tiny_experiment(tmp_path, **sections)))
        return path

    return write


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance (2 CPUs) for every integration test of the session; the driver
    attaches to it instead of starting its own."""
    import ray

    from fedsim.execution import WORKER_ENV
    from fedsim.ray_auth import require_token_auth

    require_token_auth()  # as fedsim does for the instances it starts
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV})
    yield ray
    ray.shutdown()


def config_leaf_keys(node, prefix: str = "") -> list[str]:
    """Every leaf key of a config dataclass instance (`client.lr`, ...), walked here
    independently of fedsim's own config walkers (config_docs, tracking)."""
    import dataclasses

    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += config_leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys
