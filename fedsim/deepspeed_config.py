"""`client.deepspeed` as plain data: the checks run when a config loads, and the DeepSpeed config
a worker builds from it.

Both live below the config (fedsim/config.py imports this module; it imports nothing of fedsim),
so that loading a config never imports the client package. DeepSpeed itself, and torch, are
imported only when a config sets `client.deepspeed` (DeepSpeed's import takes seconds). The
DeepSpeed backend (fedsim/client/deepspeed_trainer.py) builds its engine's config with
`worker_config`.
"""

from __future__ import annotations

import copy
import os
from typing import Any

ZERO_STAGES = (0, 1, 2)
# DeepSpeed keys whose value fedsim owns, and the client.* field each comes from.
OWNED_BY_FEDSIM = {
    "optimizer": "client.lr, client.weight_decay (fedsim builds AdamW)",
    "scheduler": "client.lr_scheduler, client.warmup_steps",
}
AUTO = "auto"  # as in Hugging Face's DeepSpeed integration: "take fedsim's value"


def deepspeed_config_problems(
    user: Any,
    *,
    batch_size: int,
    micro_batch_size: int,
    max_grad_norm: float | None,
    gpus_per_worker: float,
) -> list[str]:
    """Problems with `client.deepspeed` (empty when fine), each naming the DeepSpeed key.

    Checks the keys fedsim owns against the client.* values, the ZeRO stage and precision that a
    one-rank worker on this kind of device can run, and finally the whole built config with
    DeepSpeed's own parser (which catches misspelt ZeRO keys and wrong types).
    """
    where = "client.deepspeed"
    if not isinstance(user, dict):
        return [f"{where}: expected a mapping or the path of a DeepSpeed JSON file, got {user!r}"]
    p: list[str] = []
    accumulation = batch_size // micro_batch_size if micro_batch_size > 0 else 0
    owned = {
        "train_batch_size": (batch_size, "client.batch_size"),
        "train_micro_batch_size_per_gpu": (micro_batch_size, "client.micro_batch_size"),
        "gradient_accumulation_steps": (accumulation, "client.batch_size / micro_batch_size"),
        "gradient_clipping": (max_grad_norm or 0.0, "client.max_grad_norm"),
    }
    for key, (ours, source) in owned.items():
        if key in user and user[key] != AUTO and user[key] != ours:
            p.append(
                f"{where}.{key}: {user[key]!r} disagrees with {source} ({ours}); fedsim sets it "
                f"from {source}: remove it or set it to 'auto'"
            )
    for key, source in OWNED_BY_FEDSIM.items():
        if key in user:
            p.append(f"{where}.{key}: not allowed; fedsim sets it from {source}")

    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        p.append(f"{where}.zero_optimization: expected a mapping, got {zero!r}")
        zero = {}
    stage = zero.get("stage", 0)
    if stage not in ZERO_STAGES:
        p.append(
            f"{where}.zero_optimization.stage: expected 0, 1 or 2, got {stage!r} (stage 3 "
            "shards the frozen base across ranks; each fedsim worker is one rank)"
        )
    if zero.get("offload_param"):
        p.append(f"{where}.zero_optimization.offload_param: needs ZeRO stage 3; not supported")
    offload = zero.get("offload_optimizer") or {}
    device = offload.get("device", "none") if isinstance(offload, dict) else offload
    if device not in ("none", "cpu", None):
        p.append(f"{where}.zero_optimization.offload_optimizer.device: expected cpu or none")
    elif device == "cpu" and stage == 0:
        p.append(f"{where}.zero_optimization.offload_optimizer: needs ZeRO stage 1 or 2")

    fp16, bf16 = _enabled(user.get("fp16")), _enabled(user.get("bf16"))
    if fp16 and bf16:
        p.append(f"{where}: fp16 and bf16 are both enabled; choose one")
    if (fp16 or bf16) and stage == 0:
        # Stage 0 keeps its fp32 master weights where they cannot be set exactly from the
        # global adapter (only refreshed from the half-precision copy); ZeRO 1/2 can.
        p.append(
            f"{where}.zero_optimization.stage: {'fp16' if fp16 else 'bf16'} needs ZeRO stage 1 "
            "or 2 (with one rank per worker they shard nothing)"
        )
    if fp16 and gpus_per_worker <= 0:
        p.append(
            f"{where}.fp16: DeepSpeed's CPU accelerator has no fp16; use bf16, or GPU workers "
            "(cluster.gpus_per_worker > 0)"
        )
    if p:
        return p
    return [f"{where}{problem}" for problem in _deepspeed_parser_problems(user, batch_size)]


def _enabled(section: Any) -> bool:
    """Whether a DeepSpeed `{enabled: ...}` section is on, read as DeepSpeed's parser (pydantic)
    reads a boolean."""
    value = section.get("enabled") if isinstance(section, dict) else None
    if isinstance(value, str):
        return value.strip().lower() in {"true", "yes", "on", "1", "t", "y"}
    return value is True or (type(value) is int and value == 1)


def _deepspeed_parser_problems(user: dict[str, Any], batch_size: int) -> list[str]:
    """Run DeepSpeed's own config parser over the config a worker would build."""
    # Importing DeepSpeed picks an accelerator and, on a machine without CUDA, prints a warning
    # about it; naming the one it would pick keeps `fedsim validate` and the driver's log quiet.
    # Only for the import: DeepSpeed keeps its choice, and workers detect their own.
    named = "DS_ACCELERATOR" not in os.environ
    if named:
        import torch  # only here: config imports this module and must stay quick to import

        cuda = torch.cuda.device_count() > 0 and torch.cuda.is_available()
        os.environ["DS_ACCELERATOR"] = "cuda" if cuda else "cpu"
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    finally:
        if named:
            del os.environ["DS_ACCELERATOR"]

    # One micro-batch per step: the parser checks the user's sections, not fedsim's batch
    # arithmetic (checked above).
    built = worker_config(
        user, batch_size=batch_size, micro_batch_size=batch_size, max_grad_norm=1.0
    )
    try:
        DeepSpeedConfig(built)
    except Exception as err:  # pydantic's ValidationError, AssertionError, ValueError ...
        return [_describe(err)]
    return []


# DeepSpeed's pydantic models and the config sections they parse.
_SECTIONS = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
    "DeepSpeedBF16Config": "bf16",
    "DeepSpeedFP16Config": "fp16",
}


def _describe(err: Exception) -> str:
    """One line for an error raised by DeepSpeed's config parser, naming the key when it can."""
    errors = getattr(err, "errors", None)
    if callable(errors):  # pydantic
        section = _SECTIONS.get(getattr(err, "title", ""), "")
        first = errors()[0]
        key = ".".join([section, *map(str, first.get("loc", ()))]).strip(".")
        return f".{key}: {first.get('msg')} (DeepSpeed's config parser)"
    message = " ".join(str(err).split()) or type(err).__name__
    return f": rejected by DeepSpeed's config parser: {message}"


def worker_config(
    user: dict[str, Any] | None,
    *,
    batch_size: int,
    micro_batch_size: int,
    max_grad_norm: float | None,
) -> dict[str, Any]:
    """The DeepSpeed config of a worker: `client.deepspeed` with fedsim's batch sizes and
    clipping filled in (`deepspeed_config_problems` has refused any that disagree)."""
    cfg = copy.deepcopy(user or {})
    cfg["train_batch_size"] = batch_size
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = batch_size // micro_batch_size
    cfg["gradient_clipping"] = max_grad_norm or 0.0
    cfg.setdefault("zero_optimization", {"stage": 0})
    cfg.setdefault("steps_per_print", 2**31 - 1)  # no per-step log lines in the driver's log
    return cfg
