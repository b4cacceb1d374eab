"""The typed config tree: dataclasses, YAML loading, `--set a.b=c` overrides and validation.

A config file is YAML whose sections mirror `ExperimentConfig`. Loading walks the dataclass tree,
so an unknown key or a value of the wrong type is reported with its dotted name
(`client.lr: expected a number, got 'fast'`). `validate()` then checks ranges and cross-field rules
and reports every problem at once. The fully resolved tree, every default written out, is saved
to the run directory as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from fedsim.errors import ConfigError, FedsimInputError

PARTITION_KINDS = ("iid", "dirichlet", "shards", "by_category", "split_file")
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "scaffold")
IMPLEMENTED_STRATEGIES = ("fedavg",)
BACKENDS = ("torch", "deepspeed")
IMPLEMENTED_BACKENDS = ("torch", "deepspeed")
QUANTIZATIONS = ("8bit", "4bit")
DATA_TRANSPORTS = ("object_store", "filesystem")
LR_SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
DATA_FORMATS = ("auto", "jsonl", "json", "parquet", "arrow", "hub")


@dataclass
class RunConfig:
    name: str = "quickstart"
    """Run name; the run directory is `<output_dir>/<name>`."""
    output_dir: str = "runs"
    """Parent folder of run directories (relative paths are relative to the working directory)."""
    seed: int = 0
    """Root of every random choice: client selection, partition, LoRA init, batch order, dropout."""
    rounds: int = 3
    """Number of federated rounds."""


@dataclass
class FieldsConfig:
    """Names of the source fields that hold each part of a record."""

    instruction: str = "instruction"
    context: str | None = "context"
    response: str = "response"
    category: str | None = "category"


@dataclass
class PartitionConfig:
    kind: str = "iid"
    """iid | dirichlet | shards | by_category | split_file."""
    alpha: float = 0.5
    """Dirichlet concentration over categories (dirichlet); smaller is more skewed."""
    min_size: int = 1
    """Smallest number of records a client may hold (dirichlet resamples until met)."""
    shards_per_client: int = 2
    """Category-sorted shards per client (shards)."""
    path: str | None = None
    """JSON split file with `clients` (and optional `test`) line numbers (split_file)."""


@dataclass
class DataConfig:
    source: str = "builtin:quickstart"
    """A jsonl/json/parquet/arrow file, a hub id, or `builtin:quickstart` (generated offline)."""
    format: str = "auto"
    """auto | jsonl | json | parquet | arrow | hub."""
    builtin_records: int = 2000
    """Number of generated records for `builtin:quickstart`."""
    max_records: int | None = None
    """Use only the first N source records (quick experiments on large files)."""
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    template: str = "alpaca"
    """Prompt template: alpaca (as the FedIT reference code) or plain."""
    train_on_inputs: bool = False
    """Whether the loss also covers the prompt tokens (False masks them with -100)."""
    cutoff_len: int = 256
    """Longest tokenised example; longer ones are truncated."""
    num_clients: int = 20
    """Number of registered virtual clients."""
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    test_per_category: int = 0
    """Records of each category held out as the test split (split_file takes the file's `test`)."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TinyConfig:
    """Shape and pretraining of the built-in `tiny` model (cached on disk by these values)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 344
    pretrain_steps: int = 300


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"
    """Hub id, local directory, or `tiny` (the built-in model)."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16 for the frozen base model."""
    quantization: str | None = None
    """null | 8bit | 4bit: load the frozen base quantized with bitsandbytes (QLoRA-style) to fit
    large models on small GPUs; needs CUDA workers and `pip install fedsim[gpu]`."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)


@dataclass
class ClientConfig:
    backend: str = "torch"
    """Local trainer: torch | deepspeed."""
    local_steps: int | None = 10
    """Optimizer steps per client per round; set to null to use local_epochs instead."""
    local_epochs: float | None = None
    """Passes over the client's shard per round (used when local_steps is null)."""
    batch_size: int = 8
    """Examples per optimizer step."""
    micro_batch_size: int = 8
    """Examples per forward pass; batch_size / micro_batch_size steps of gradient accumulation."""
    lr: float = 3e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    """constant | linear | cosine (decaying over the client's local steps)."""
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    """Gradient clipping; null disables it."""
    deepspeed: Any = None
    """DeepSpeed settings for `backend: deepspeed`: an inline mapping in DeepSpeed's own config
    format, or the path of a DeepSpeed JSON file (read at load time; config.yaml records its
    content). ZeRO stage 0/1/2, bf16/fp16, zero_optimization.offload_optimizer and the like go
    here; batch sizes, gradient clipping, optimizer and lr schedule come from client.* (keys that
    disagree with them are errors). null: ZeRO stage 0 in the model's dtype."""


@dataclass
class ServerConfig:
    strategy: str = "fedavg"
    clients_per_round: int | None = 5
    """Clients sampled each round (set this or `fraction`)."""
    fraction: float | None = None
    """Fraction of registered clients sampled each round (at least one)."""
    weighting: str = "samples"
    """samples (n_i / sum n, as FedIT) | uniform."""


@dataclass
class ClusterConfig:
    address: str | None = None
    """Ray address to attach to; null uses RAY_ADDRESS or starts a local instance."""
    num_workers: int | None = None
    """ClientWorker actors; null sizes the pool from the cluster's resources."""
    gpus_per_worker: float = 0.0
    """GPUs per ClientWorker; fractions share a GPU (0.5: two workers per GPU)."""
    cpus_per_worker: float = 1.0
    """CPUs per ClientWorker (also its torch thread count)."""
    data_transport: str = "object_store"
    """How client shards (and the built-in tiny model) reach workers: object_store (put once per
    run in Ray's object store; works across nodes without a shared filesystem) | filesystem
    (workers memory-map `<run dir>/shards`; every node must see the run directory)."""
    wait_for_nodes_s: float = 0.0
    """Seconds to wait for the cluster to grow (an autoscaling cluster starting GPU nodes) until
    the worker pool fits; 0 fails at once when it does not fit the nodes present."""


@dataclass
class JudgeConfig:
    base_url: str | None = None
    model: str = "gpt-4"
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (never the key itself)."""


@dataclass
class EvalConfig:
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def training_hash(self) -> str:
        """sha256 of every setting that changes what training produces.

        Left out: the number of rounds (a resumed run may be extended), placement (`cluster`) and
        evaluation settings, none of which change a round's adapter.
        """
        tree = self.to_dict()
        tree["run"] = {k: v for k, v in tree["run"].items() if k != "rounds"}
        for section in ("cluster", "eval"):
            tree.pop(section)
        return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading: YAML -> dataclass tree, with dotted names in every error
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is list:
        return "a list"
    return "a mapping"


def _convert(value: Any, tp: Any, dotted: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; returns the converted value or None on error."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], dotted, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{dotted}: expected a mapping, got {value!r}")
            return None
        return _build(tp, value, dotted, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{dotted}: expected a list, got {value!r}")
            return None
        return [_convert(v, item_tp, f"{dotted}[{i}]", problems) for i, v in enumerate(value)]
    if tp is Any:  # free-form (e.g. a DeepSpeed config); checked in validate()
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string
            return float(value)
        except ValueError:
            pass
    if (isinstance(value, bool) and tp is not bool) or not isinstance(value, tp):
        problems.append(f"{dotted}: expected {_type_name(tp)}, got {value!r}")
        return None
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            problems.append(f"{where}: unknown key; expected one of {', '.join(sorted(known))}")
    kwargs = {}
    for name in known & raw.keys():
        dotted = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(raw[name], hints[name], dotted, problems)
    return cls(**kwargs)


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override to a raw config mapping; the value is parsed as YAML."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise FedsimInputError(f"--set {assignment!r}: expected KEY=VALUE, e.g. client.lr=1e-4")
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FedsimInputError(f"--set {key}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise FedsimInputError(
            f"--set {key}: value {text!r} is not valid YAML ({getattr(err, 'problem', err)})"
        ) from None


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_path(text: str, dotted: str, problems: list[str]) -> str:
    """Expand `${VAR}` and `${VAR:-default}` (as a shell does) and a leading `~` in a path field,
    so that shipped experiments can say where data lives without hard-coding a machine's paths."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            problems.append(f"{dotted}: environment variable {name} is not set")
            return match.group(0)
        return value

    expanded = _VAR.sub(substitute, text)
    return os.path.expanduser(expanded) if expanded.startswith("~") else expanded


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate the config tree; raises ConfigError listing every problem."""
    problems: list[str] = []
    cfg = _build(ExperimentConfig, raw, "", problems)
    if not problems:
        cfg.data.source = expand_path(cfg.data.source, "data.source", problems)
        if cfg.data.partition.path:
            path = expand_path(cfg.data.partition.path, "data.partition.path", problems)
            cfg.data.partition.path = path
        if isinstance(cfg.client.deepspeed, str):
            cfg.client.deepspeed = _read_deepspeed_file(cfg.client.deepspeed, problems)
    if not problems:
        problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_deepspeed_file(text: str, problems: list[str]) -> Any:
    """The mapping in the DeepSpeed JSON file named by `client.deepspeed` (None on error)."""
    path = Path(expand_path(text, "client.deepspeed", problems))
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"client.deepspeed: DeepSpeed config file not found: {path}")
        return None
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"client.deepspeed: cannot read {path} ({err})")
        return None
    except json.JSONDecodeError as err:
        problems.append(f"client.deepspeed: {path}:{err.lineno}: not valid JSON ({err.msg})")
        return None
    if not isinstance(content, dict):
        problems.append(f"client.deepspeed: {path}: expected a JSON object")
        return None
    return content


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment, apply `--set` overrides, and validate it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FedsimInputError(f"{path}: config file not found") from None
    except UnicodeDecodeError as err:
        raise FedsimInputError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except OSError as err:
        raise FedsimInputError(f"{path}: cannot read config file ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise FedsimInputError(
            f"{where}: not valid YAML ({getattr(err, 'problem', err)})"
        ) from None
    if not isinstance(raw, dict):
        raise FedsimInputError(f"{path}: expected a mapping of sections (run, data, model, ...)")
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError([f"{path}: {p}" for p in err.problems]) from None


# --------------------------------------------------------------------------------------------
# Validation: ranges and cross-field rules, every problem collected
# --------------------------------------------------------------------------------------------


def _choice(problems: list[str], dotted: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{dotted}: expected one of {', '.join(allowed)}, got {value!r}")


def _positive(problems: list[str], dotted: str, value: float | None, zero_ok: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        problems.append(f"{dotted}: expected a value {bound}, got {value}")


def validate(cfg: ExperimentConfig) -> list[str]:
    """Range and consistency checks; returns the list of problems (empty when valid)."""
    p: list[str] = []
    if not cfg.run.name or "/" in cfg.run.name:
        p.append(f"run.name: expected a non-empty name without '/', got {cfg.run.name!r}")
    _positive(p, "run.rounds", cfg.run.rounds)
    _positive(p, "run.seed", cfg.run.seed, zero_ok=True)

    d = cfg.data
    _choice(p, "data.format", d.format, DATA_FORMATS)
    _choice(p, "data.partition.kind", d.partition.kind, PARTITION_KINDS)
    _positive(p, "data.num_clients", d.num_clients)
    _positive(p, "data.cutoff_len", d.cutoff_len)
    _positive(p, "data.builtin_records", d.builtin_records)
    _positive(p, "data.max_records", d.max_records)
    _positive(p, "data.test_per_category", d.test_per_category, zero_ok=True)
    _positive(p, "data.partition.alpha", d.partition.alpha)
    _positive(p, "data.partition.min_size", d.partition.min_size)
    _positive(p, "data.partition.shards_per_client", d.partition.shards_per_client)
    if d.partition.kind == "split_file" and not d.partition.path:
        p.append("data.partition.path: required when data.partition.kind is split_file")

    m = cfg.model
    if not m.name_or_path:
        p.append("model.name_or_path: expected a hub id, a local directory or 'tiny'")
    _choice(p, "model.dtype", m.dtype, DTYPES)
    if m.quantization is not None:
        p.extend(_quantization_problems(cfg))
    _positive(p, "model.lora.r", m.lora.r)
    _positive(p, "model.lora.alpha", m.lora.alpha)
    if not 0 <= m.lora.dropout < 1:
        p.append(f"model.lora.dropout: expected a value in [0, 1), got {m.lora.dropout}")
    if not m.lora.target_modules:
        p.append("model.lora.target_modules: expected at least one module name, e.g. [q_proj]")
    t = m.tiny
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
        _positive(p, f"model.tiny.{name}", getattr(t, name))
    _positive(p, "model.tiny.pretrain_steps", t.pretrain_steps, zero_ok=True)
    if t.num_heads > 0 and t.hidden_size % t.num_heads:
        p.append("model.tiny.hidden_size: expected a multiple of model.tiny.num_heads")

    c = cfg.client
    _choice(p, "client.backend", c.backend, BACKENDS)
    if c.backend in BACKENDS and c.backend not in IMPLEMENTED_BACKENDS:
        p.append(f"client.backend: {c.backend!r} is not available in this version; use torch")
    if c.deepspeed is not None:
        p.extend(_deepspeed_problems(cfg))
    _choice(p, "client.lr_scheduler", c.lr_scheduler, LR_SCHEDULERS)
    if (c.local_steps is None) == (c.local_epochs is None):
        p.append(
            "client.local_steps: set exactly one of client.local_steps and client.local_epochs"
        )
    _positive(p, "client.local_steps", c.local_steps)
    _positive(p, "client.local_epochs", c.local_epochs)
    _positive(p, "client.batch_size", c.batch_size)
    _positive(p, "client.micro_batch_size", c.micro_batch_size)
    if c.batch_size > 0 and c.micro_batch_size > 0 and c.batch_size % c.micro_batch_size:
        p.append(
            f"client.batch_size: expected a multiple of client.micro_batch_size "
            f"({c.micro_batch_size}), got {c.batch_size}"
        )
    _positive(p, "client.lr", c.lr)
    _positive(p, "client.weight_decay", c.weight_decay, zero_ok=True)
    _positive(p, "client.warmup_steps", c.warmup_steps, zero_ok=True)
    _positive(p, "client.max_grad_norm", c.max_grad_norm)

    s = cfg.server
    _choice(p, "server.strategy", s.strategy, STRATEGIES)
    if s.strategy in STRATEGIES and s.strategy not in IMPLEMENTED_STRATEGIES:
        p.append(f"server.strategy: {s.strategy!r} is not available in this version; use fedavg")
    _choice(p, "server.weighting", s.weighting, ("samples", "uniform"))
    if (s.clients_per_round is None) == (s.fraction is None):
        p.append("server.clients_per_round: set exactly one of clients_per_round and fraction")
    _positive(p, "server.clients_per_round", s.clients_per_round)
    if s.fraction is not None and not 0 < s.fraction <= 1:
        p.append(f"server.fraction: expected a value in (0, 1], got {s.fraction}")
    if s.clients_per_round and d.num_clients > 0 and s.clients_per_round > d.num_clients:
        p.append(
            f"server.clients_per_round: {s.clients_per_round} is more than "
            f"data.num_clients ({d.num_clients})"
        )

    k = cfg.cluster
    _positive(p, "cluster.num_workers", k.num_workers)
    _positive(p, "cluster.gpus_per_worker", k.gpus_per_worker, zero_ok=True)
    _positive(p, "cluster.cpus_per_worker", k.cpus_per_worker)
    if k.gpus_per_worker > 1 and not float(k.gpus_per_worker).is_integer():
        # Ray's rule: fractions only below one GPU.
        p.append(f"cluster.gpus_per_worker: above 1 it must be whole, got {k.gpus_per_worker}")
    _choice(p, "cluster.data_transport", k.data_transport, DATA_TRANSPORTS)
    _positive(p, "cluster.wait_for_nodes_s", k.wait_for_nodes_s, zero_ok=True)
    return p


def _quantization_problems(cfg: ExperimentConfig) -> list[str]:
    """8/4-bit base models need bitsandbytes on CUDA: refuse them where no worker can have it."""
    q = cfg.model.quantization
    if q not in QUANTIZATIONS:
        return [
            f"model.quantization: expected null or one of {', '.join(QUANTIZATIONS)}, got {q!r}"
        ]
    if cfg.cluster.gpus_per_worker <= 0:
        return [
            f"model.quantization: {q} (bitsandbytes) runs on CUDA GPUs only; "
            "set cluster.gpus_per_worker > 0 or remove model.quantization"
        ]
    if not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        # A local run trains on this machine, so it needs CUDA here. With a cluster address the
        # workers' nodes are checked when the pool starts instead.
        import torch

        if not torch.cuda.is_available():
            return [
                f"model.quantization: {q} (bitsandbytes) needs a CUDA GPU and this machine has "
                "none; remove model.quantization, or run on a GPU cluster (cluster.address)"
            ]
    return []


def _deepspeed_problems(cfg: ExperimentConfig) -> list[str]:
    # DeepSpeed is imported only for configs that use it (its import takes seconds).
    from fedsim.client.deepspeed_trainer import deepspeed_config_problems

    c = cfg.client
    return deepspeed_config_problems(
        c.deepspeed,
        batch_size=c.batch_size,
        micro_batch_size=c.micro_batch_size,
        max_grad_norm=c.max_grad_norm,
        gpus_per_worker=cfg.cluster.gpus_per_worker,
    )


def clients_per_round(cfg: ExperimentConfig) -> int:
    """Number of clients sampled each round, from `clients_per_round` or `fraction`."""
    if cfg.server.clients_per_round is not None:
        return cfg.server.clients_per_round
    assert cfg.server.fraction is not None
    return max(1, round(cfg.server.fraction * cfg.data.num_clients))
