"""What crosses the actor boundary: the driver hands a worker a `ClientTask` (and the strategy's
`ClientContext` for that client); the worker returns a frozen `ClientOutcome` and, through the
object store straight to the aggregator, a `ClientUpload` made by `encode_upload`.

Client code and server code both import this module and never each other; the aggregator reads
an upload back with `fedsim.server.aggregation.decode_upload`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the driver builds tasks and reads outcomes without torch
    import torch

TensorDict = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class ClientTask:
    """One client's turn in one round, as the driver hands it to a worker."""

    round_idx: int
    client_id: int
    seed: int
    shard_ref: Any = None
    """ObjectRef of the bytes of the shard block holding the client (object-store transport);
    fetched only when the worker does not have that block open already."""


@dataclass(frozen=True)
class ClientContext:
    """What a server strategy or the client's profile changes about local training; the default
    changes nothing. Tensors are keyed by PEFT adapter names (`model.adapter_parameters`)."""

    prox_mu: float = 0.0
    """FedProx: adds (mu/2)*||w - w_global||^2 over the trainable parameters to each step's loss."""
    correction: TensorDict | None = None
    """SCAFFOLD: c - c_i; after every optimizer step w <- w - lr_t * (c - c_i)."""
    lora_rank: int | None = None
    """Heterogeneous ranks: train only the first `lora_rank` LoRA components (see lora_ranks)."""
    freeze_lora_a: bool = False
    """FFA-LoRA: every `lora_A` stays at the value it starts from (no gradient, no decay)."""
    start: TensorDict | None = None
    """FedSA-LoRA: tensors that replace the global adapter's as local training starts (the
    client's own `lora_B`, kept between its rounds), at the global adapter's shapes."""
    base_delta: Any = None
    """FLoRA: the delta merged into the base weights so far ({base weight name: float64}), or an
    ObjectRef of it (put once per round by the aggregator); None: the base as loaded."""
    base_version: int = 0
    """FLoRA: the last round merged into `base_delta` (0: none), so a worker merges it once."""

    @property
    def is_plain(self) -> bool:
        """True when it changes nothing about local training."""
        return (
            not self.prox_mu
            and self.correction is None
            and self.lora_rank is None
            and not self.freeze_lora_a
            and self.start is None
            and self.base_delta is None
        )

    def nbytes(self) -> int:
        """Tensor bytes sent to the worker with the context (SCAFFOLD's correction, FedSA-LoRA's
        own B)."""
        return tensors_nbytes(self.correction or {}) + tensors_nbytes(self.start or {})


@dataclass(frozen=True)
class ClientOutcome:
    """The result of one client's turn, successful or not (the adapter travels separately)."""

    client_id: int
    ok: bool
    num_samples: int = 0
    losses: list[float] = field(default_factory=list)
    examples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    worker: str = ""
    node: str = ""
    """Ray node id of the worker."""
    error: str | None = None
    attempts: int = 1
    """Which try this outcome is from (a client whose worker died is retried)."""
    worker_lost: bool = False
    """The worker process died during this client's turn (as opposed to training raising)."""
    peak_rss_mb: float = 0.0
    """Peak RSS of the worker's process at the end of this turn, MiB (0: the turn never ran)."""
    upload_bytes: int = 0
    """Bytes of the upload the worker returned (`ClientUpload.nbytes`; 0 when the turn failed)."""
    context_bytes: int = 0
    """Tensor bytes of the `ClientContext` the worker received (SCAFFOLD's correction)."""

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def tensors_nbytes(tensors: TensorDict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class ClientUpload:
    """One client's upload: its update and, for stateful strategies, its new client state."""

    tensors: TensorDict
    encoding: str = "raw"
    """raw (the trained adapter) or the compression kind of a delta (fp16, bf16, int8, topk)."""
    rank: int | None = None
    """LoRA rank the client trained (None: the global rank)."""
    client_state: TensorDict = field(default_factory=dict)
    """SCAFFOLD: the client's new control variate. (FedSA-LoRA's kept B is read from `tensors`
    by the strategy, so it is not sent twice.)"""

    def nbytes(self) -> int:
        """Bytes sent on the uplink: the update's tensors and the client state."""
        return tensors_nbytes(self.tensors) + tensors_nbytes(self.client_state)


def encode_upload(
    local: TensorDict,
    global_adapter: TensorDict,
    compression: str = "none",
    block_size: int | None = None,
    topk_fraction: float = 0.1,
    rank: int | None = None,
) -> ClientUpload:
    """The upload of a client whose trained adapter is `local`."""
    from fedsim.compression import compress
    from fedsim.lora_ranks import truncate_adapter

    if rank is not None:
        local, global_adapter = (
            truncate_adapter(local, rank),
            truncate_adapter(global_adapter, rank),
        )
    if compression == "none":
        return ClientUpload(local, "raw", rank)
    delta = {k: local[k].double() - g.double() for k, g in global_adapter.items()}
    return ClientUpload(compress(delta, compression, block_size, topk_fraction), compression, rank)
