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
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from fedsim.deepspeed_config import deepspeed_config_problems
from fedsim.errors import ConfigError, FedsimInputError

# Every closed set of values a field takes is a Literal here, and only here: the loader checks it
# (`typing.get_args`), the configuration reference lists it, and the registries that implement
# the names (strategies, partitioners, templates, compression) are tested against it.
DataFormat = Literal["auto", "jsonl", "json", "parquet", "arrow", "hub"]
TemplateName = Literal["alpaca", "plain"]
PartitionKind = Literal["iid", "dirichlet", "shards", "by_category", "split_file"]
Dtype = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["8bit", "4bit"]
Backend = Literal["torch", "deepspeed"]
LrScheduler = Literal["constant", "linear", "cosine"]
CompressionKind = Literal["none", "fp16", "bf16", "int8", "topk"]
StrategyName = Literal[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadagrad",
    "fedyogi",
    "fedadam",
    "scaffold",
    "ffa_lora",
    "fedsa_lora",
    "flexlora",
    "flora",
]
SelectionKind = Literal["uniform", "round_robin", "all", "availability"]
ServerMode = Literal["sync", "async"]
StalenessRuleName = Literal["constant", "polynomial", "hinge"]
Weighting = Literal["samples", "uniform"]
AvailabilityDistribution = Literal["constant", "uniform", "beta"]
RobustRule = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"]
DataTransport = Literal["object_store", "filesystem"]
WandbMode = Literal["offline", "online"]


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
    """Source field of the instruction (required in every record)."""
    context: str | None = "context"
    """Source field of the optional input shown with the instruction; null: records have none."""
    response: str = "response"
    """Source field of the reference answer (required in every record)."""
    category: str | None = "category"
    """Source field of the record's category, which the non-iid partitions and the held-out
    test split group by; null: every record has an empty category."""


@dataclass
class PartitionConfig:
    kind: PartitionKind = "iid"
    """How records are split among clients: iid (uniformly at random), dirichlet (category
    proportions drawn per client), shards (category-sorted shards), by_category (one category
    per client), split_file (fixed split read from `path`)."""
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
    format: DataFormat = "auto"
    """Format of `source`; auto picks it from the file extension (a hub id otherwise)."""
    builtin_records: int = 2000
    """Number of generated records for `builtin:quickstart`."""
    max_records: int | None = None
    """Use only the first N source records (quick experiments on large files)."""
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    template: TemplateName = "alpaca"
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
    test_per_client: float = 0.0
    """Fraction of each client's records held out as its own test slice (seeded, removed from its
    training shard, listed in partition.json) for `fedsim eval --personalized`; 0: none."""


@dataclass
class LoraConfig:
    r: int = 8
    """Rank of the low-rank update."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Names (or dotted name suffixes) of the Linear layers that get an adapter."""


@dataclass
class TinyConfig:
    """Shape and pretraining of the built-in `tiny` model (cached on disk by these values)."""

    vocab_size: int = 1024
    """Tokenizer vocabulary size (byte-level BPE)."""
    hidden_size: int = 128
    """Width of the residual stream (a multiple of num_heads)."""
    num_layers: int = 2
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention heads per layer."""
    intermediate_size: int = 344
    """Width of the MLP."""
    pretrain_steps: int = 1500
    """Optimizer steps of causal-LM pretraining; 0 leaves the model at its random init. 1500
    (about 95 s on one core) is what the built-in tasks need (docs/miniature.md)."""


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"
    """Hub id, local directory, or `tiny` (the built-in model)."""
    dtype: Dtype = "float32"
    """Precision of the frozen base model's weights."""
    quantization: Quantization | None = None
    """Load the frozen base quantized with bitsandbytes (QLoRA-style) to fit large models on
    small GPUs; needs CUDA workers and `pip install fedsim[gpu]`. null: not quantized."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)


@dataclass
class CompressionConfig:
    """Uplink compression of each client's delta (decompressed at the aggregator)."""

    kind: CompressionKind = "none"
    """How a delta is encoded: none (float32), fp16/bf16 (cast), int8 (scaled), topk (largest
    entries only)."""
    block_size: int | None = None
    """int8: elements sharing one scale; null gives one scale per tensor."""
    topk_fraction: float = 0.1
    """topk: fraction of each tensor's entries sent (the largest by magnitude)."""


@dataclass
class ClientConfig:
    backend: Backend = "torch"
    """Local trainer: plain torch, or a DeepSpeed engine configured by `deepspeed`."""
    local_steps: int | None = 10
    """Optimizer steps per client per round; set to null to use local_epochs instead."""
    local_epochs: float | None = None
    """Passes over the client's shard per round (used when local_steps is null)."""
    batch_size: int = 8
    """Examples per optimizer step."""
    micro_batch_size: int = 8
    """Examples per forward pass; batch_size / micro_batch_size steps of gradient accumulation."""
    lr: float = 3e-4
    """Peak learning rate of the client's AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler: LrScheduler = "constant"
    """Learning rate schedule over the client's local steps (linear and cosine decay to 0)."""
    warmup_steps: int = 0
    """Local steps of linear warmup from 0 to `lr` (every round starts again from step 0)."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping; null disables it."""
    deepspeed: Any = None
    """DeepSpeed settings for `backend: deepspeed`: an inline mapping in DeepSpeed's own config
    format, or the path of a DeepSpeed JSON file (read at load time; config.yaml records its
    content). ZeRO stage 0/1/2, bf16/fp16, zero_optimization.offload_optimizer and the like go
    here; batch sizes, gradient clipping, optimizer and lr schedule come from client.* (keys that
    disagree with them are errors). null: ZeRO stage 0 in the model's dtype."""
    profile: str | None = None
    """Per-client profile file (YAML/JSON: `default`, `classes`, `clients`) giving each client's
    `availability` probability, `lora_rank`, and the simulated device's `speed`,
    `bandwidth_mbps` and `dropout` (used when system.enabled); see docs/algorithms.md, "Client
    profiles"."""
    compression: CompressionConfig = field(default_factory=CompressionConfig)


@dataclass
class AvailabilityConfig:
    """Per-client availability probabilities for clients the profile does not cover, drawn once
    per run from the seed."""

    distribution: AvailabilityDistribution = "constant"
    """constant (every client `value`), uniform (`low`..`high`) or beta (`a`, `b`)."""
    value: float = 1.0
    """constant: every client's availability probability, in [0, 1]."""
    low: float = 0.2
    """uniform: lowest availability probability, in [0, 1]."""
    high: float = 1.0
    """uniform: highest availability probability, in [0, 1]."""
    a: float = 2.0
    """beta: first shape parameter (> 0)."""
    b: float = 2.0
    """beta: second shape parameter (> 0)."""


@dataclass
class RobustConfig:
    """Defences against bad or malicious updates (`rule` other than mean buffers a round's
    updates in the aggregator: one adapter per client in memory)."""

    clip_norm: float | None = None
    """Clip each client's delta to this L2 norm before aggregation; null disables it."""
    rule: RobustRule = "mean"
    """mean (streaming), or median, trimmed_mean, krum, multi_krum: coordinate-wise or
    distance-based rules over the round's buffered updates, which ignore sample weights."""
    trim_beta: float = 0.1
    """trimmed_mean: fraction of updates dropped at each end of every coordinate."""
    num_byzantine: int = 1
    """Number of faulty clients per round the rule must tolerate (f); fixes how many updates
    median (2f+1), trimmed_mean (floor(beta*n) >= f), krum and multi_krum (2f+3) need."""
    multi_krum_m: int | None = None
    """multi_krum: updates averaged; null takes n - f."""


@dataclass
class DPConfig:
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018)."""

    enabled: bool = False
    """Clip every client's delta and add Gaussian noise to the average (needs weighting
    uniform and robust at its defaults)."""
    clip_norm: float = 0.1
    """C: each client's delta is clipped to this L2 norm."""
    noise_multiplier: float = 1.0
    """sigma: Gaussian noise of std sigma*C/k is added to the mean of the k selected clients."""
    delta: float = 1e-5
    """The delta at which the cumulative epsilon is reported every round."""


@dataclass
class StalenessConfig:
    """Asynchronous training: how much an update counts by its staleness s, the server steps
    applied since its client started (Xie et al. 2019). Every factor lies in (0, 1] and is 1 at
    s = 0; see docs/async.md."""

    rule: StalenessRuleName = "polynomial"
    """constant (1), polynomial ((1 + s)^-a) or hinge (1 up to s = b, then 1 / (a (s - b) + 1))."""
    a: float = 0.5
    """polynomial: the exponent (0.5 is 1 / sqrt(1 + s)); hinge: the slope past b."""
    b: float = 4.0
    """hinge: the staleness up to which an update keeps its full weight."""


ASYNC_KEYS = ("concurrency", "buffer_size", "staleness")
"""server keys that only asynchronous training reads (left out of a sync run's training hash)."""


@dataclass
class ServerConfig:
    mode: ServerMode = "sync"
    """sync: rounds, each waiting for all its clients; async: buffered asynchronous training on
    the simulated clock (FedBuff; FedAsync with buffer_size 1 and a server lr below 1), where
    run.rounds counts server steps; it needs system.enabled. See docs/async.md."""
    concurrency: int | None = None
    """async: clients in training at any simulated moment; required with mode async."""
    buffer_size: int = 10
    """async: updates per server step (FedBuff's K)."""
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    strategy: StrategyName = "fedavg"
    """How the server turns the round's averaged delta into the next global adapter."""
    selection: SelectionKind = "uniform"
    """Which clients train each round: uniform (seeded per round, without replacement),
    round_robin (ids in order), all, or availability (each client online with its probability
    from the profile or `availability`)."""
    availability: AvailabilityConfig = field(default_factory=AvailabilityConfig)
    clients_per_round: int | None = 5
    """Clients sampled each round (set this or `fraction`)."""
    fraction: float | None = None
    """Fraction of registered clients sampled each round (at least one)."""
    weighting: Weighting = "samples"
    """Weights of the average: samples (n_i / sum n, as FedIT) or uniform (1 / k)."""
    lr: float | None = None
    """Server learning rate (eta); null: 1.0 for fedavg, fedprox, fedavgm, scaffold, ffa_lora
    and fedsa_lora, 0.01 for fedadagrad, fedyogi and fedadam; flexlora and flora have none."""
    momentum: float = 0.9
    """fedavgm: server momentum (beta)."""
    beta1: float = 0.9
    """fedadagrad, fedyogi, fedadam: first-moment decay."""
    beta2: float = 0.99
    """fedyogi, fedadam: second-moment decay."""
    tau: float = 1e-3
    """fedadagrad, fedyogi, fedadam: adaptivity (added to the root of the second moment)."""
    prox_mu: float = 0.01
    """fedprox: weight mu of the proximal term (mu/2)*||w - w_global||^2."""
    robust: RobustConfig = field(default_factory=RobustConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    client_ids: list[int] | None = None
    """Train only these client ids, every round (e.g. one id for a local-only baseline); when
    set, clients_per_round and fraction are ignored."""
    min_updates: int | None = None
    """Over-selection (with system.enabled): while fewer than this many of the round's clients
    would report (the rest dropped out or missed the deadline), invite more clients, drawn from
    the seed. null: the round is as large as the clients that make it."""


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
    data_transport: DataTransport = "object_store"
    """How client shards (and the built-in tiny model) reach workers: object_store (put once per
    run in Ray's object store; works across nodes without a shared filesystem) or filesystem
    (workers memory-map `<run dir>/shards`; every node must see the run directory)."""
    wait_for_nodes_s: float = 0.0
    """Seconds to wait for the cluster to grow (an autoscaling cluster starting GPU nodes) until
    the worker pool fits; 0 fails at once when it does not fit the nodes present."""
    max_client_retries: int = 2
    """Times a client is retried when its worker dies mid-turn, before it is dropped."""
    max_worker_restarts: int = 3
    """Times Ray restarts a dead worker process (reloading the base model) before giving up."""
    aggregator_threads: int = 1
    """Threads the aggregator folds each update with (the tensors' elements split between them).
    The global adapter is bitwise the same for any number; more help on a head node with idle
    cores and large adapters (benchmarks/aggregation.py --cluster)."""
    overlap_checkpoints: bool = True
    """Write round r's checkpoint in the aggregator's background thread while round r+1 trains
    (false: write it before the next round starts). Either way a round's metrics line is written
    only once its checkpoint is on disk."""
    allow_unauthenticated: bool = False
    """Attach to a Ray cluster whose token authentication is off (anyone who reaches it can run
    code there). Refused by default: fedsim checks before attaching. The local instance fedsim
    starts itself always uses token authentication."""


@dataclass
class GenerationConfig:
    """How evaluation answers are generated."""

    max_new_tokens: int = 64
    """Longest answer, in tokens (per turn)."""
    temperature: float = 0.0
    """0 decodes greedily; above 0 samples, seeded by `seed`."""
    top_p: float = 1.0
    """Nucleus sampling mass (only when temperature > 0)."""
    batch_size: int = 16
    """Prompts generated together (padded on the left)."""
    seed: int = 0
    """Seed of sampled generation."""


@dataclass
class JudgeConfig:
    """LLM-as-judge through the `openai` client: OpenAI or any OpenAI-compatible server."""

    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://localhost:8000/v1; null is OpenAI's API."""
    model: str = "gpt-4"
    """Judge model name as the endpoint knows it."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (never the key itself); null sends no
    key, for local servers without authentication."""
    single: bool = False
    """Grade every answer 1-10 (single-v1; single-math-v1 with a reference answer)."""
    baseline: str | None = None
    """Compare every answer pairwise (pair-v2, judged in both orders) against: `round:N` of this
    run, `base` (the base model without adapter), or another run directory `PATH` or `PATH@N`
    (its latest round unless N is given), e.g. a local-only run."""
    prompts: str = "${FEDSIM_DATA_DIR:-../shared/data}/eval/judge_prompts.jsonl"
    """Judge prompt templates (FastChat's judge_prompts.jsonl: single-v1, pair-v2, ...)."""
    max_tokens: int = 1024
    """Longest judge reply, in tokens."""
    concurrency: int = 4
    """Judge requests in flight at once."""
    timeout_seconds: float = 120.0
    """Per-request timeout."""
    max_retries: int = 6
    """Retries of a request that got 429, a 5xx, a timeout or a connection error."""
    backoff_seconds: float = 2.0
    """First retry delay; doubles each retry (capped at 60 s); a Retry-After header wins."""
    cache_dir: str | None = None
    """Cache of judgments keyed by judge model and prompt; null is $FEDSIM_CACHE_DIR/judge."""
    price_input_per_million: float | None = None
    """USD per million prompt tokens for the cost estimate; null uses the list price of a few
    known OpenAI models, or records no cost."""
    price_output_per_million: float | None = None
    """USD per million completion tokens (see price_input_per_million)."""


@dataclass
class EvalConfig:
    """`fedsim eval`: which questions, how answers are generated, how they are judged."""

    question_sets: list[str] = field(default_factory=lambda: ["test"])
    """test (the run's held-out split), vicuna, mtbench (from questions_dir), or a jsonl path."""
    questions_dir: str = "${FEDSIM_DATA_DIR:-../shared/data}/eval"
    """Folder of vicuna_questions.jsonl, mtbench_questions.jsonl, mtbench_reference_gpt4.jsonl."""
    max_questions: int | None = None
    """At most this many questions per set, taken round-robin over categories."""
    exact_match: bool | None = None
    """Score exact match on the test split; null: only for built-in data, whose answers are
    unique."""
    num_threads: int = 1
    """torch threads of the evaluation process (keep it small beside a training run)."""
    poll_seconds: float = 5.0
    """How often `fedsim eval --watch` looks for new rounds."""
    probe_per_category: int = 0
    """During `fedsim run`: after each round, exact match of the new global adapter on this many
    held-out records per category (greedy, on a worker; the round line and metrics.jsonl show
    it). 0: off. Needs answers with one right form (built-in data, or `exact_match: true`)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class SystemConfig:
    """Simulated system heterogeneity (fedsim.server.system_model); off unless `enabled`."""

    enabled: bool = False
    """Simulate per-client speed, bandwidth and dropout, and drop stragglers at the deadline."""
    step_seconds: float = 1.0
    """Simulated seconds of one local step on a client of speed 1."""
    speed_sigma: float = 0.0
    """Log-normal spread of clients' relative compute speed (median 1; 0 = all equal)."""
    bandwidth_mbps: float = 100.0
    """Median link bandwidth in megabits per second (adapter download + upload)."""
    bandwidth_sigma: float = 0.0
    """Log-normal spread of clients' bandwidth (0 = all equal)."""
    dropout: float = 0.0
    """Probability a sampled client drops out of the round."""
    deadline_seconds: float | None = None
    """Simulated round deadline; clients that would finish later are dropped. null: no deadline."""


@dataclass
class MlflowConfig:
    """An MLflow tracking server or store (`pip install fedsim[mlflow]`); off while uri is empty."""

    uri: str = ""
    """Tracking URI, e.g. http://127.0.0.1:5000, sqlite:///mlflow.db or file:///path/mlruns;
    empty: off. No credentials in it: MLflow reads them from MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN."""
    experiment: str = "fedsim"
    """MLflow experiment the run is filed under (created when missing)."""
    run_name: str = ""
    """Name of the MLflow run; empty: run.name."""


@dataclass
class WandbConfig:
    """Weights & Biases (`pip install fedsim[wandb]`); off while project is empty."""

    project: str = ""
    """W&B project; empty: off."""
    entity: str = ""
    """W&B user or team; empty: the default entity of the logged-in account."""
    name: str = ""
    """Display name of the W&B run; empty: run.name."""
    mode: WandbMode = "offline"
    """offline writes the run under `dir` only, to upload later with `wandb sync`; online sends
    it as it goes (the key comes from `wandb login` or WANDB_API_KEY, never from the config)."""
    dir: str = ""
    """Folder W&B writes its wandb/ folder into; empty: the run directory."""


@dataclass
class TrackingConfig:
    """Experiment tracking: the config, per-round training metrics, evaluation results and the
    report's plots also go to MLflow and/or W&B. Leaves training untouched (not part of the
    training hash), so it may be turned on for `--resume`."""

    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def training_hash(self) -> str:
        """sha256 of every setting that changes what training produces.

        Left out: the number of rounds (a resumed run may be extended), placement (`cluster`),
        evaluation and tracking settings, none of which change a round's adapter.
        """
        tree = self.to_dict()
        tree["run"] = {k: v for k, v in tree["run"].items() if k != "rounds"}
        for section in ("cluster", "eval", "tracking"):
            tree.pop(section)
        if not self.system.enabled:  # off changes nothing (and keeps older runs' hashes)
            tree.pop("system")
        if not self.data.test_per_client:  # likewise: runs from before it keep their hashes
            tree["data"].pop("test_per_client")
        if self.server.mode == "sync":  # likewise for the asynchronous settings
            for key in ("mode", *ASYNC_KEYS):
                tree["server"].pop(key)
        return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading: YAML -> dataclass tree, with dotted names in every error
# --------------------------------------------------------------------------------------------


INT64_MAX = 2**63 - 1
"""Largest integer any field takes: seeds, counts and sizes end up in numpy and torch int64s."""
FREE_FORM_DEPTH = 64
"""Deepest nesting accepted in a free-form value (a DeepSpeed mapping is a few levels deep)."""
SHOWN_CHARS = 60
"""Longest echo of a wrong value in an error line; the rest is elided."""

# Fields whose value may be a credential pasted by mistake: errors name their type, never the
# value, so that it does not end up in a terminal, a CI log or a bug report.
_SECRET_NAME = re.compile(r"key|token|secret|passw|credential", re.IGNORECASE)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is list:
        return "a list"
    return "a mapping"


def _kind_of(value: Any) -> str:
    """The type of a YAML value in words (`a list`), for errors that must not show the value."""
    kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    kinds |= {list: "a list", dict: "a mapping", type(None): "null"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _show(value: Any, dotted: str) -> str:
    """`value` as an error line shows it: its repr, shortened, or only its type for a field
    whose name says it may hold a secret."""
    if _SECRET_NAME.search(dotted.rsplit(".", 1)[-1]):
        return _kind_of(value)
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _key_text(key: Any) -> str:
    """A mapping key as it appears in a dotted name; quoted when it is not plain printable text
    (a line break in a key would otherwise split one error into two lines)."""
    if isinstance(key, str) and key.isprintable() and key:
        return key
    return _show(key, "")


def _text_problem(text: str) -> str | None:
    """Why a string cannot be used as text (paths, names, YAML written back), or None."""
    if "\0" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from an argument that was not UTF-8
        return "is not valid Unicode text"
    return None


def _convert(value: Any, tp: Any, dotted: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; returns the converted value or None on error."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if typing.get_origin(args[0]) is Literal:
            return _choice(value, args[0], dotted, problems, nullable=True)
        return _convert(value, args[0], dotted, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{dotted}: expected a mapping, got {_show(value, dotted)}")
            return None
        return _build(tp, value, dotted, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{dotted}: expected a list, got {_show(value, dotted)}")
            return None
        return [_convert(v, item_tp, f"{dotted}[{i}]", problems) for i, v in enumerate(value)]
    if origin is Literal:
        return _choice(value, tp, dotted, problems)
    if tp is Any:  # free-form (e.g. a DeepSpeed config); its content is checked in validate()
        before = len(problems)
        _check_free_form(value, dotted, problems, set(), 0)
        return value if len(problems) == before else None
    if tp is float:
        return _to_float(value, dotted, problems)
    if (isinstance(value, bool) and tp is not bool) or not isinstance(value, tp):
        problems.append(f"{dotted}: expected {_type_name(tp)}, got {_show(value, dotted)}")
        return None
    problem = _scalar_problem(value)
    if problem:
        problems.append(f"{dotted}: {problem}")
        return None
    return value


def _choice(
    value: Any, tp: Any, dotted: str, problems: list[str], nullable: bool = False
) -> str | None:
    """`value` if it is one of the Literal `tp`'s values, else None with a problem listing them."""
    allowed = typing.get_args(tp)
    if isinstance(value, str) and value in allowed:
        return value
    listed = f"one of {', '.join(allowed)}"
    expected = f"null or {listed}" if nullable else listed
    problems.append(f"{dotted}: expected {expected}, got {_show(value, dotted)}")
    return None


def _scalar_problem(value: Any) -> str | None:
    """Why an int or str of the right type is still unusable, or None."""
    if isinstance(value, str):
        return _text_problem(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        return f"expected an integer of at most {INT64_MAX} in magnitude, got {_show(value, '')}"
    return None


def _to_float(value: Any, dotted: str, problems: list[str]) -> float | None:
    """A float field's value: a finite number (ints and numeric strings are converted)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        problems.append(f"{dotted}: expected a number, got {_show(value, dotted)}")
        return None
    try:  # YAML 1.1 reads "3e-4" as a string; float() also turns "nan", "inf", "1e999" into ones
        number = float(value)
    except ValueError:
        problems.append(f"{dotted}: expected a number, got {_show(value, dotted)}")
        return None
    except OverflowError:
        problems.append(f"{dotted}: expected a finite number, got an integer too large for a float")
        return None
    if not math.isfinite(number):
        # NaN passes every range check in validate() (all its comparisons are false) and trains
        # to the end on NaN losses; infinity overflows sleeps and schedules.
        problems.append(f"{dotted}: expected a finite number, got {number}")
        return None
    return number


def _check_free_form(
    value: Any, dotted: str, problems: list[str], open_ids: set[int], depth: int
) -> None:
    """Problems anywhere inside a free-form value: non-finite numbers, unusable strings, a
    mapping that contains itself (a YAML alias inside its own anchor), absurd nesting."""
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{dotted}: expected a finite number, got {value}")
    elif isinstance(value, str) and (problem := _text_problem(value)):
        problems.append(f"{dotted}: {problem}")
    elif isinstance(value, dict | list):
        if id(value) in open_ids:
            problems.append(f"{dotted}: refers to itself (a YAML alias inside its own anchor)")
            return
        if depth >= FREE_FORM_DEPTH:
            problems.append(f"{dotted}: nested more than {FREE_FORM_DEPTH} levels deep")
            return
        items = value.items() if isinstance(value, dict) else enumerate(value)
        open_ids.add(id(value))
        for key, item in items:
            where = f"{dotted}.{_key_text(key)}" if isinstance(value, dict) else f"{dotted}[{key}]"
            _check_free_form(item, where, problems, open_ids, depth + 1)
        open_ids.discard(id(value))


def _build(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{prefix}.{_key_text(key)}" if prefix else _key_text(key)
            problems.append(f"{where}: unknown key; expected one of {', '.join(sorted(names))}")
    kwargs = {}
    for name in names:  # in declaration order, so that problems come in a stable order
        if name in raw:
            dotted = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _convert(raw[name], hints[name], dotted, problems)
    return cls(**kwargs)


class _BadYaml(Exception):
    """YAML text that PyYAML cannot turn into values: the reason, and the 1-based line if known."""

    def __init__(self, reason: str, line: int | None) -> None:
        super().__init__(reason)
        self.reason, self.line = reason, line


def _safe_load(text: str) -> Any:
    """`yaml.safe_load`, raising `_BadYaml` with a one-line reason for anything it rejects."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        reason = getattr(err, "problem", None) or str(err)
        raise _BadYaml(reason.splitlines()[0], mark.line + 1 if mark else None) from None
    except RecursionError:
        raise _BadYaml("nested too deeply", None) from None
    except ValueError as err:
        # PyYAML's constructors call int(), float() and datetime() unguarded: `2020-13-45` looks
        # like a date and is not one, `!!int abc` is no integer, and int() refuses 5000 digits.
        raise _BadYaml(str(err).splitlines()[0] if str(err) else "a bad value", None) from None
    except Exception:  # only PyYAML runs in the try, on text nobody has checked
        # Explicit tags on the wrong scalar fail inside the constructors with whatever the
        # conversion raises: `!!int` alone an IndexError, `!!bool maybe` a KeyError,
        # `!!timestamp x` an AttributeError.
        raise _BadYaml("a tagged value that cannot be built", None) from None


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override to a raw config mapping; the value is parsed as YAML."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FedsimInputError(
            f"--set {_show(assignment, '')}: expected KEY=VALUE, e.g. client.lr=1e-4"
        )
    shown = _key_text(key)
    *parents, leaf = key.split(".")
    if not all(part.strip() for part in [*parents, leaf]):
        raise FedsimInputError(f"--set {shown}: empty name between dots, e.g. client.lr=1e-4")
    try:
        value = _safe_load(text)
    except _BadYaml as err:
        # The reason may quote the text, so a field that may hold a secret shows neither.
        if _SECRET_NAME.search(leaf):
            raise FedsimInputError(f"--set {shown}: value is not valid YAML") from None
        raise FedsimInputError(
            f"--set {shown}: value {_show(text, '')} is not valid YAML ({err.reason})"
        ) from None
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FedsimInputError(f"--set {shown}: {_key_text(part)} is not a section")
    node[leaf] = value


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


def resolve_path(text: str, dotted: str) -> str:
    """`expand_path` for a single field, raising FedsimInputError on an unset variable. The eval
    paths are kept unexpanded in config.yaml and resolved here when used, because evaluation may
    run on another machine or in another folder than training did."""
    problems: list[str] = []
    expanded = expand_path(text, dotted, problems)
    if problems:
        raise ConfigError(problems)
    return expanded


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
        if cfg.client.profile:
            cfg.client.profile = expand_path(cfg.client.profile, "client.profile", problems)
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
    except OSError as err:
        problems.append(f"client.deepspeed: cannot read {path} ({err.strerror})")
        return None
    except UnicodeDecodeError as err:
        problems.append(f"client.deepspeed: {path}: not UTF-8 text ({err.reason})")
        return None
    except json.JSONDecodeError as err:
        problems.append(f"client.deepspeed: {path}:{err.lineno}: not valid JSON ({err.msg})")
        return None
    except (ValueError, RecursionError) as err:  # 5000-digit integers; nesting past the stack
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        problems.append(f"client.deepspeed: {path}: not valid JSON ({reason})")
        return None
    if not isinstance(content, dict):
        problems.append(f"client.deepspeed: {path}: expected a JSON object")
        return None
    before = len(problems)
    # JSON has no NaN, but Python's reader takes NaN and Infinity: the same rule as inline.
    _check_free_form(content, "client.deepspeed", problems, set(), 0)
    return content if len(problems) == before else None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment, apply `--set` overrides, and validate it."""
    path = Path(path)
    try:
        raw = _safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedsimInputError(f"{path}: config file not found") from None
    except UnicodeDecodeError as err:
        raise FedsimInputError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except OSError as err:
        raise FedsimInputError(f"{path}: cannot read config file ({err.strerror})") from None
    except _BadYaml as err:
        where = f"{path}:{err.line}" if err.line else str(path)
        raise FedsimInputError(f"{where}: not valid YAML ({err.reason})") from None
    if raw is None:  # an empty file: every default
        raw = {}
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


def _positive(problems: list[str], dotted: str, value: float | None, zero_ok: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        problems.append(f"{dotted}: expected a value {bound}, got {value}")


# Upper bounds far beyond any real use, so that a typo of a few extra digits is an error line here
# and not a hang (generating 10**12 records), an out-of-memory kill (a 2**40 batch) or an
# overflow deep inside torch hours into a run. Seconds stop at about 30 years: time.sleep()
# overflows on larger ones.
UPPER_LIMITS: dict[str, float] = {
    "run.rounds": 1_000_000,
    "data.builtin_records": 10_000_000,
    "data.max_records": 10**12,
    "data.cutoff_len": 1_048_576,
    "data.num_clients": 1_000_000,
    "data.test_per_category": 10_000_000,
    "data.partition.min_size": 10_000_000,
    "data.partition.shards_per_client": 1_000_000,
    "model.lora.r": 65_536,
    "model.lora.alpha": 1_048_576,
    "model.tiny.vocab_size": 1_048_576,
    "model.tiny.hidden_size": 65_536,
    "model.tiny.num_layers": 1024,
    "model.tiny.num_heads": 1024,
    "model.tiny.intermediate_size": 262_144,
    "model.tiny.pretrain_steps": 10_000_000,
    "client.local_steps": 10_000_000,
    "client.local_epochs": 1_000_000,
    "client.batch_size": 1_048_576,
    "client.micro_batch_size": 1_048_576,
    "client.warmup_steps": 10_000_000,
    "client.compression.block_size": 2**31,
    "server.robust.num_byzantine": 1_000_000,
    "server.robust.multi_krum_m": 1_000_000,
    "server.min_updates": 1_000_000,
    "server.concurrency": 1_000_000,
    "server.buffer_size": 1_000_000,
    "cluster.num_workers": 100_000,
    "cluster.gpus_per_worker": 1024,
    "cluster.cpus_per_worker": 100_000,
    "cluster.wait_for_nodes_s": 1e9,
    "cluster.max_client_retries": 1000,
    "cluster.max_worker_restarts": 1000,
    "cluster.aggregator_threads": 1024,
    "eval.max_questions": 10**9,
    "eval.num_threads": 4096,
    "eval.poll_seconds": 1e9,
    "eval.probe_per_category": 1_000_000,
    "eval.generation.max_new_tokens": 1_048_576,
    "eval.generation.batch_size": 1_048_576,
    "eval.judge.max_tokens": 1_048_576,
    "eval.judge.concurrency": 4096,
    "eval.judge.timeout_seconds": 1e9,
    "eval.judge.max_retries": 1000,
    "eval.judge.backoff_seconds": 1e9,
    "system.step_seconds": 1e9,
    "system.deadline_seconds": 1e9,
}


def _upper_limits(p: list[str], cfg: ExperimentConfig) -> None:
    for dotted, limit in UPPER_LIMITS.items():
        value: Any = cfg
        for name in dotted.split("."):
            value = getattr(value, name)
        if value is not None and value > limit:
            shown = int(limit) if float(limit).is_integer() else limit
            p.append(f"{dotted}: expected a value <= {shown}, got {value}")


def validate(cfg: ExperimentConfig) -> list[str]:
    """Range and consistency checks; returns the list of problems (empty when valid)."""
    p: list[str] = []
    if problem := run_name_problem(cfg.run.name):
        p.append(f"run.name: {problem}")
    _positive(p, "run.rounds", cfg.run.rounds)
    _positive(p, "run.seed", cfg.run.seed, zero_ok=True)

    d = cfg.data
    _positive(p, "data.num_clients", d.num_clients)
    _positive(p, "data.cutoff_len", d.cutoff_len)
    _positive(p, "data.builtin_records", d.builtin_records)
    _positive(p, "data.max_records", d.max_records)
    _positive(p, "data.test_per_category", d.test_per_category, zero_ok=True)
    if not 0 <= d.test_per_client < 1:
        p.append(f"data.test_per_client: expected a fraction in [0, 1), got {d.test_per_client}")
    _positive(p, "data.partition.alpha", d.partition.alpha)
    _positive(p, "data.partition.min_size", d.partition.min_size)
    _positive(p, "data.partition.shards_per_client", d.partition.shards_per_client)
    if d.partition.kind == "split_file" and not d.partition.path:
        p.append("data.partition.path: required when data.partition.kind is split_file")

    m = cfg.model
    if not m.name_or_path:
        p.append("model.name_or_path: expected a hub id, a local directory or 'tiny'")
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
    if c.deepspeed is not None:
        p.extend(_deepspeed_problems(cfg))
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
    if s.client_ids is not None:
        # client_ids wins over clients_per_round/fraction, which are then not checked
        _client_ids(p, s.client_ids, d.num_clients)
    elif (s.clients_per_round is None) == (s.fraction is None):
        p.append("server.clients_per_round: set exactly one of clients_per_round and fraction")
    _positive(p, "server.clients_per_round", s.clients_per_round)
    if s.fraction is not None and not 0 < s.fraction <= 1:
        p.append(f"server.fraction: expected a value in (0, 1], got {s.fraction}")
    if (
        s.client_ids is None
        and s.mode == "sync"  # async runs draw no rounds
        and s.clients_per_round
        and d.num_clients > 0
        and s.clients_per_round > d.num_clients
    ):
        p.append(
            f"server.clients_per_round: {s.clients_per_round} is more than "
            f"data.num_clients ({d.num_clients})"
        )

    _validate_algorithms(p, cfg)

    k = cfg.cluster
    _positive(p, "cluster.num_workers", k.num_workers)
    _positive(p, "cluster.gpus_per_worker", k.gpus_per_worker, zero_ok=True)
    _positive(p, "cluster.cpus_per_worker", k.cpus_per_worker)
    if k.gpus_per_worker > 1 and not float(k.gpus_per_worker).is_integer():
        # Ray's rule: fractions only below one GPU.
        p.append(f"cluster.gpus_per_worker: above 1 it must be whole, got {k.gpus_per_worker}")
    _positive(p, "cluster.wait_for_nodes_s", k.wait_for_nodes_s, zero_ok=True)
    _positive(p, "cluster.max_client_retries", k.max_client_retries, zero_ok=True)
    _positive(p, "cluster.max_worker_restarts", k.max_worker_restarts, zero_ok=True)
    _positive(p, "cluster.aggregator_threads", k.aggregator_threads)
    _validate_eval(p, cfg.eval)
    _validate_probe(p, cfg)
    y = cfg.system
    _positive(p, "system.step_seconds", y.step_seconds)
    _positive(p, "system.speed_sigma", y.speed_sigma, zero_ok=True)
    _positive(p, "system.bandwidth_mbps", y.bandwidth_mbps)
    _positive(p, "system.bandwidth_sigma", y.bandwidth_sigma, zero_ok=True)
    _positive(p, "system.deadline_seconds", y.deadline_seconds)
    if not 0 <= y.dropout <= 1:
        p.append(f"system.dropout: must be in [0, 1], got {y.dropout}")
    _validate_min_updates(p, cfg)
    _validate_async(p, cfg)
    _validate_tracking(p, cfg.tracking)
    _upper_limits(p, cfg)
    return p


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be a run directory's name, or None: the one rule for `run.name`.

    It must be one plain path component, so that `<output_dir>/<name>` can never point above or
    beside the output dir: "." or ".." would make it output_dir or its parent, which
    --overwrite replaces; a leading dot hides it; over 255 bytes no filesystem can create it.
    """
    if not name:
        return "expected a non-empty name"
    if name.startswith("."):
        return f"expected a plain folder name, got {_show(name, '')} (no leading dot, '.' or '..')"
    if any(sep in name for sep in ("/", "\\")) or os.sep in name:
        return f"expected a single folder name, got {_show(name, '')} (no path separators)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"expected a plain folder name, got {_show(name, '')} (no control characters)"
    if len(name.encode("utf-8")) > 255:
        return "expected a folder name of at most 255 bytes"
    return None


def _validate_min_updates(p: list[str], cfg: ExperimentConfig) -> None:
    s = cfg.server
    if s.min_updates is None:
        return
    _positive(p, "server.min_updates", s.min_updates)
    if not cfg.system.enabled:
        p.append(
            "server.min_updates: over-selection makes up for simulated dropouts and stragglers; "
            "it needs system.enabled: true"
        )
    if s.min_updates > cfg.data.num_clients:
        p.append(
            f"server.min_updates: {s.min_updates} is more than data.num_clients "
            f"({cfg.data.num_clients})"
        )
    if s.client_ids is not None or s.selection == "all":
        p.append("server.min_updates: cannot over-select with server.client_ids or selection all")
    if s.dp.enabled:
        p.append("server.min_updates: DP accounting assumes clients_per_round clients a round")


ASYNC_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "ffa_lora")
"""Strategies whose server step is a function of one mean delta, so an asynchronous step can
apply it: the others keep per-client state between a client's turns (scaffold, fedsa_lora) or
combine a whole round's factors from one global version (flexlora, flora)."""


def _validate_async(p: list[str], cfg: ExperimentConfig) -> None:
    """server.mode async and its settings: what asynchronous steps cannot do is refused."""
    s = cfg.server
    _positive(p, "server.concurrency", s.concurrency)
    _positive(p, "server.buffer_size", s.buffer_size)
    _positive(p, "server.staleness.a", s.staleness.a, zero_ok=True)
    _positive(p, "server.staleness.b", s.staleness.b, zero_ok=True)
    if s.mode == "sync":
        if s.concurrency is not None:
            p.append("server.concurrency: only server.mode async reads it")
        return
    n = cfg.data.num_clients
    if s.concurrency is None:
        p.append("server.concurrency: required with server.mode async (clients training at once)")
    elif n > 0 and s.concurrency > n:
        p.append(f"server.concurrency: {s.concurrency} is more than data.num_clients ({n})")
    if not cfg.system.enabled:
        p.append(
            "system.enabled: server.mode async runs on the simulated clock of the system model; "
            "set system.enabled: true (and system.speed_sigma for devices of different speeds)"
        )
    if s.strategy not in ASYNC_STRATEGIES:
        p.append(
            f"server.strategy: {s.strategy} cannot run asynchronously (it keeps per-client state "
            f"or combines a whole round from one version); use one of {', '.join(ASYNC_STRATEGIES)}"
        )
    if s.robust.rule != "mean":
        p.append(
            f"server.robust.rule: {s.robust.rule} needs a whole round of updates from one global "
            "version; asynchronous steps fold stale updates: use rule mean"
        )
    if s.dp.enabled:
        p.append(
            "server.dp.enabled: the accountant assumes a uniform sample of clients_per_round "
            "clients a round, which asynchronous steps are not; turn DP off with server.mode async"
        )
    if s.client_ids is not None:
        p.append("server.client_ids: asynchronous training draws each client among the idle ones")
    if s.selection != "uniform":
        p.append(
            f"server.selection: asynchronous training draws each client uniformly among the idle "
            f"ones; {s.selection} is for rounds: set uniform"
        )
    if s.min_updates is not None:
        p.append(
            "server.min_updates: over-selection is for rounds; asynchronous training keeps "
            "server.concurrency clients in flight"
        )


def _quantization_problems(cfg: ExperimentConfig) -> list[str]:
    """8/4-bit base models need bitsandbytes on CUDA: refuse them where no worker can have it."""
    q = cfg.model.quantization
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
    c = cfg.client
    return deepspeed_config_problems(
        c.deepspeed,
        batch_size=c.batch_size,
        micro_batch_size=c.micro_batch_size,
        max_grad_norm=c.max_grad_norm,
        gpus_per_worker=cfg.cluster.gpus_per_worker,
    )


def _in_unit(p: list[str], dotted: str, value: float, upper_open: bool = False) -> None:
    if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        p.append(f"{dotted}: expected a value in {bound}, got {value}")


def _validate_algorithms(p: list[str], cfg: ExperimentConfig) -> None:
    """Server strategy parameters, selection, robust rules, DP and compression."""
    s, c = cfg.server, cfg.client
    av = s.availability
    for name in ("value", "low", "high"):
        _in_unit(p, f"server.availability.{name}", getattr(av, name))
    if av.low > av.high:
        p.append(f"server.availability.low: {av.low} is above server.availability.high")
    _positive(p, "server.availability.a", av.a)
    _positive(p, "server.availability.b", av.b)
    _positive(p, "server.lr", s.lr)
    for name in ("momentum", "beta1", "beta2"):
        _in_unit(p, f"server.{name}", getattr(s, name), upper_open=True)
    _positive(p, "server.tau", s.tau)
    _positive(p, "server.prox_mu", s.prox_mu, zero_ok=True)

    r = s.robust
    _positive(p, "server.robust.clip_norm", r.clip_norm)
    if not 0 < r.trim_beta < 0.5:
        p.append(f"server.robust.trim_beta: expected a value in (0, 0.5), got {r.trim_beta}")
    _positive(p, "server.robust.num_byzantine", r.num_byzantine, zero_ok=True)
    _positive(p, "server.robust.multi_krum_m", r.multi_krum_m)
    if r.rule != "mean" and not p:
        n = clients_per_round(cfg)
        need = min_updates(r.rule, r.num_byzantine, r.trim_beta, n)
        if need > n:
            p.append(
                f"server.robust.rule: {r.rule} with num_byzantine={r.num_byzantine} needs at "
                f"least {need} updates per round, but a round has at most {n} clients"
            )
        if r.multi_krum_m and r.multi_krum_m > n - r.num_byzantine:
            p.append(
                f"server.robust.multi_krum_m: {r.multi_krum_m} is more than clients per round "
                f"minus num_byzantine ({n - r.num_byzantine})"
            )
    if s.strategy == "scaffold" and r.rule != "mean":
        p.append("server.robust.rule: scaffold averages control variates; use rule mean")

    d = s.dp
    _positive(p, "server.dp.clip_norm", d.clip_norm)
    _positive(p, "server.dp.noise_multiplier", d.noise_multiplier)
    if not 0 < d.delta < 1:
        p.append(f"server.dp.delta: expected a value in (0, 1), got {d.delta}")
    if d.enabled:
        if s.weighting != "uniform":
            p.append(
                "server.weighting: DP-FedAvg averages with fixed weights; set it to uniform "
                "when server.dp.enabled"
            )
        if r.rule != "mean" or r.clip_norm is not None:
            p.append(
                "server.robust: DP clips with server.dp.clip_norm and needs rule mean; "
                "leave server.robust at its defaults when server.dp.enabled"
            )
        if s.strategy == "scaffold":
            p.append("server.strategy: scaffold's control variates are not covered by server.dp")
        if s.strategy == "fedsa_lora":
            p.append("server.strategy: fedsa_lora's client-kept B factors are not covered by DP")
    if s.strategy in ("flexlora", "flora"):
        name = s.strategy
        if s.lr not in (None, 1.0):
            p.append(f"server.lr: {name} replaces the adapter (no server learning rate)")
        if r.rule != "mean" or r.clip_norm is not None:
            p.append(f"server.robust: {name} combines the clients' products; leave the defaults")
        if d.enabled:
            p.append(f"server.strategy: {name}'s product of client factors is not covered by DP")
    if s.strategy == "flora":
        if cfg.model.quantization is not None:
            p.append("model.quantization: flora merges updates into the base weights; set null")
        if cfg.eval.probe_per_category:
            p.append(
                "eval.probe_per_category: the probe runs on a worker before the round's merge "
                "reaches it; set 0 with flora and use fedsim eval"
            )
    if s.strategy == "fedsa_lora" and c.compression.kind != "none":
        p.append(
            "client.compression.kind: fedsa_lora keeps each client's B exactly as trained; "
            "set it to none"
        )

    z = c.compression
    _positive(p, "client.compression.block_size", z.block_size)
    if not 0 < z.topk_fraction <= 1:
        p.append(f"client.compression.topk_fraction: expected (0, 1], got {z.topk_fraction}")


def min_updates(rule: str, f: int, beta: float = 0.1, n: int | None = None) -> int:
    """Fewest updates `rule` needs to tolerate `f` faulty ones.

    median: 2f+1 (a strict majority of honest values around every coordinate's middle);
    trimmed_mean: floor(beta*n) >= f, i.e. n >= ceil(f / beta) (each end drops at least f);
    krum, multi_krum: 2f+3 (Blanchard et al. 2017: n > 2f + 2). `n` is unused (kept for callers
    that state the round size)."""
    if rule == "mean":
        return 1
    if rule == "median":
        return 2 * f + 1
    if rule == "trimmed_mean":
        need = 1
        while math.floor(beta * need) < f:
            need += 1
        return need
    if rule in ("krum", "multi_krum"):
        return 2 * f + 3
    raise ValueError(f"unknown robust rule {rule!r}")


def _client_ids(p: list[str], ids: list[int], num_clients: int) -> None:
    if not ids:
        p.append("server.client_ids: expected at least one client id, or null")
    bad = [i for i in ids if not 0 <= i < num_clients]
    if bad:
        p.append(
            f"server.client_ids: {bad} out of range; data.num_clients={num_clients} "
            f"means ids 0..{num_clients - 1}"
        )
    if len(set(ids)) != len(ids):
        p.append(f"server.client_ids: duplicate ids in {ids}")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BASELINE_ROUND = re.compile(r"^round:\d+$")


def _validate_probe(p: list[str], cfg: ExperimentConfig) -> None:
    n = cfg.eval.probe_per_category
    _positive(p, "eval.probe_per_category", n, zero_ok=True)
    if n <= 0:
        return
    exact = cfg.eval.exact_match
    if exact is False or (exact is None and not cfg.data.source.startswith("builtin:")):
        p.append(
            "eval.probe_per_category: exact match needs answers with one right form "
            "(built-in data, or eval.exact_match: true)"
        )
    if cfg.data.test_per_category == 0 and cfg.data.partition.kind != "split_file":
        p.append(
            "eval.probe_per_category: the probe reads the test split; data.test_per_category is 0"
        )


def _validate_eval(p: list[str], e: EvalConfig) -> None:
    if not e.question_sets:
        p.append("eval.question_sets: expected at least one of test, vicuna, mtbench or a path")
    _positive(p, "eval.max_questions", e.max_questions)
    _positive(p, "eval.num_threads", e.num_threads)
    _positive(p, "eval.poll_seconds", e.poll_seconds)
    g = e.generation
    _positive(p, "eval.generation.max_new_tokens", g.max_new_tokens)
    _positive(p, "eval.generation.temperature", g.temperature, zero_ok=True)
    if not 0 < g.top_p <= 1:
        p.append(f"eval.generation.top_p: expected a value in (0, 1], got {g.top_p}")
    _positive(p, "eval.generation.batch_size", g.batch_size)
    _positive(p, "eval.generation.seed", g.seed, zero_ok=True)
    j = e.judge
    if j.api_key_env is not None and not _ENV_NAME.match(j.api_key_env):
        # Someone pasted the key itself: say so without echoing it into a terminal or a log.
        p.append(
            "eval.judge.api_key_env: expected the NAME of an environment variable (e.g. "
            "OPENAI_API_KEY) that holds the key, not the key itself"
        )
    if not j.model:
        p.append("eval.judge.model: expected a model name, e.g. gpt-4")
    if j.baseline is not None and j.baseline.startswith("round:"):
        if not _BASELINE_ROUND.match(j.baseline):
            p.append(f"eval.judge.baseline: expected round:N, got {j.baseline!r}")
    elif j.baseline is not None and not j.baseline:
        p.append("eval.judge.baseline: expected round:N, base, or a run directory")
    _positive(p, "eval.judge.max_tokens", j.max_tokens)
    _positive(p, "eval.judge.concurrency", j.concurrency)
    _positive(p, "eval.judge.timeout_seconds", j.timeout_seconds)
    _positive(p, "eval.judge.max_retries", j.max_retries, zero_ok=True)
    _positive(p, "eval.judge.backoff_seconds", j.backoff_seconds, zero_ok=True)
    _positive(p, "eval.judge.price_input_per_million", j.price_input_per_million, zero_ok=True)
    _positive(p, "eval.judge.price_output_per_million", j.price_output_per_million, zero_ok=True)


def clients_per_round(cfg: ExperimentConfig) -> int:
    """Clients selected each round, the one definition: every id of `server.client_ids` when
    set, every client with selection `all`, else `server.clients_per_round` or `server.fraction`
    of data.num_clients (at least one). With selection `availability` a round may find fewer
    online; over-selection (`server.min_updates`) may invite more."""
    if cfg.server.client_ids is not None:
        return len(cfg.server.client_ids)
    if cfg.server.selection == "all":
        return cfg.data.num_clients
    if cfg.server.clients_per_round is not None:
        return cfg.server.clients_per_round
    assert cfg.server.fraction is not None
    return max(1, round(cfg.server.fraction * cfg.data.num_clients))


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_WANDB_PROJECT = re.compile(r"^[^/\\#?%:\s]{1,128}$")


def _validate_tracking(p: list[str], t: TrackingConfig) -> None:
    m = t.mlflow
    if m.uri:
        scheme = m.uri.split(":", 1)[0].lower() if _URI_SCHEME.match(m.uri) else ""
        if scheme in ("http", "https") and "@" in m.uri.split("//", 1)[-1].split("/", 1)[0]:
            # user:password@host would be copied into config.yaml and every log line naming it
            p.append(
                "tracking.mlflow.uri: no credentials in the URI; set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
            )
        elif scheme in ("http", "https") and not m.uri.split("//", 1)[-1].strip("/"):
            p.append(
                f"tracking.mlflow.uri: expected a host, e.g. http://127.0.0.1:5000, got {m.uri!r}"
            )
        elif any(ch.isspace() for ch in m.uri):
            p.append("tracking.mlflow.uri: expected a URI without spaces")
        if not m.experiment.strip():
            p.append("tracking.mlflow.experiment: expected an experiment name, e.g. fedsim")
    w = t.wandb
    if w.project and not _WANDB_PROJECT.match(w.project):
        p.append(
            "tracking.wandb.project: expected at most 128 characters without spaces or "
            f"/ \\ # ? % :, got {w.project!r}"
        )
    if w.entity and not _WANDB_PROJECT.match(w.entity):
        p.append(f"tracking.wandb.entity: expected a user or team name, got {w.entity!r}")
