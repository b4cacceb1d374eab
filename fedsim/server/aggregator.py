"""The Aggregator: folds client updates in as they arrive and writes each round's checkpoint.

It runs as a Ray actor (`AggregatorActor`) beside the workers; `Aggregator` itself is a plain
class so the round logic is testable without Ray. Updates reach it straight from the workers
through the object store (the driver only passes references). For the plain strategies it holds
O(1) adapters: the global one, and one int64 accumulator per tensor. A robust rule (median,
trimmed mean, Krum) needs the whole round at once, so only then are the round's deltas buffered.

Each update is decoded (decompressed, padded to the global rank) and checked before it is folded
in; a bad one is rejected with its reason, and the round's weights renormalise over the accepted
ones. With DP, each delta is clipped, the mean uses the fixed number of selected clients, and
seeded Gaussian noise is added; the accountant's cumulative epsilon goes to round.json.

Checkpoints are written off the critical path: `finish_round` hands round r's checkpoint to one
background thread and returns the new adapter at once, so the write overlaps round r+1's training;
round r+1's `finish_round` (or `flush`) waits for it first, keeping the rounds on disk in order.
Each of those calls reports the checkpoints that became durable during it, so the driver records a
round's metrics only once its checkpoint is on disk. A failed write raises there, naming the path.
Strategies with per-client state (SCAFFOLD, FedSA-LoRA) write in line: their state files commit
with the round. Strategies that combine the clients' products B_i @ A_i (FlexLoRA, FLoRA) get the
round's decoded deltas at its end, as a robust rule does; FLoRA's merged base delta reaches the
workers by reference in each client's context.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import torch

from fedsim import checkpoint, faults
from fedsim.config import ExperimentConfig, clients_per_round
from fedsim.errors import UpdateRejected
from fedsim.faults import exit_if_aggregator_fault
from fedsim.protocol import ClientContext, ClientUpload, tensors_nbytes
from fedsim.resources import peak_rss_mb
from fedsim.round_record import RoundRecord, TrainedRound
from fedsim.server.aggregation import WeightedDeltaSum, clip_delta, decode_upload
from fedsim.server.client_state import ClientStateStore
from fedsim.server.lora_native import is_lora_a, is_lora_b
from fedsim.server.privacy import dp_epsilon, gaussian_noise
from fedsim.server.robust import min_updates, robust_aggregate
from fedsim.server.strategies import make_strategy

TensorDict = dict[str, torch.Tensor]


def adapter_nbytes(adapter: TensorDict) -> int:
    return tensors_nbytes(adapter)


class Aggregator:
    """Round-by-round aggregation and checkpointing for one run directory."""

    def __init__(
        self,
        run_dir: str,
        cfg: ExperimentConfig,
        adapter_config: dict[str, Any],
        provenance: dict[str, str],
    ) -> None:
        self.run_dir = Path(run_dir)
        server = cfg.server
        lora = cfg.model.lora
        self.strategy = make_strategy(
            server.strategy, server, cfg.data.num_clients, cfg.run.seed, lora.alpha / lora.r
        )
        self.weighting = server.weighting
        self.robust, self.dp = server.robust, server.dp
        self.seed, self.num_clients = cfg.run.seed, cfg.data.num_clients
        # the accountant's sampling: uniform selection amplifies, the others count in full
        uniform = server.selection == "uniform" and server.client_ids is None
        self.dp_per_round = clients_per_round(cfg) if uniform else None
        self.block_size = cfg.client.compression.block_size
        self.fold_threads = cfg.cluster.aggregator_threads
        self.client_states = (
            ClientStateStore(self.run_dir) if self.strategy.uses_client_state else None
        )
        self.adapter_config = adapter_config
        self.provenance = provenance
        self.global_adapter: TensorDict = {}
        self._base_handle: tuple[int, Any] | None = None
        """FLoRA: (rounds merged, the merged base delta or its ObjectRef), put once per version."""
        self._sum: WeightedDeltaSum | None = None
        self._buffer: dict[int, TensorDict] = {}
        self._weights: dict[int, int] = {}
        self._units: dict[int, int] | None = None
        """Asynchronous steps: each update's n_i 2^30; the mean divides by the accepted ones'."""
        self._rejected: dict[int, str] = {}
        self._accepted: list[int] = []
        self._bytes: dict[int, int] = {}
        self._ranks: dict[int, int] = {}
        self._norms: dict[int, float] = {}
        self._round = 0
        self._fold_seconds = 0.0
        self.overlap = cfg.cluster.overlap_checkpoints and self.client_states is None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future[dict[str, Any]] | None = None

    @property
    def buffered(self) -> bool:
        """Whether the round's deltas are kept until it ends: a robust rule, or a strategy that
        aggregates the clients' products (FlexLoRA), needs the whole round."""
        return self.robust.rule != "mean" or self.strategy.aggregates_products

    @property
    def clip_norm(self) -> float | None:
        return self.dp.clip_norm if self.dp.enabled else self.robust.clip_norm

    def set_global(self, adapter: TensorDict, server_state: TensorDict | None = None) -> None:
        """Start from `adapter` (the initial one, or a checkpoint's) and the strategy's state."""
        self.global_adapter = {k: v.clone() for k, v in adapter.items()}
        self.strategy.load_state_dict(server_state or {})

    def restore(self, round_dir: str) -> TensorDict:
        """Start from the checkpoint in `round_dir` (verified by the caller), as `set_global`;
        returns its adapter, which the workers then train from."""
        state = checkpoint.load_round(Path(round_dir))
        self.set_global(state.adapter, state.server_state)
        return state.adapter

    def read_adapter(self, round_dir: str) -> TensorDict:
        """The adapter of the checkpoint in `round_dir` (asynchronous clients in flight started
        from an older version)."""
        return checkpoint.load_round(Path(round_dir)).adapter

    def global_nbytes(self) -> int:
        """Bytes of the global adapter, what each client downloads."""
        if not self.global_adapter:  # set_global or restore has not run, or failed
            raise RuntimeError("the aggregator holds no global adapter")
        return adapter_nbytes(self.global_adapter)

    def client_context(self, client_id: int, lora_rank: int | None = None) -> ClientContext:
        """What client `client_id`'s local training needs this round (from the strategy, its
        stored state, and its LoRA rank)."""
        exit_if_aggregator_fault(self._round, "exit_in_client_context")  # fault tests only
        state = self.client_states.load(client_id) if self.client_states else None
        context = self.strategy.client_context(self.global_adapter, state)
        context = dataclasses.replace(context, lora_rank=lora_rank)
        if self.strategy.merges_into_base:
            version, delta = self._base_delta_handle()
            context = dataclasses.replace(context, base_delta=delta, base_version=version)
        return context

    def client_contexts(
        self, client_ids: list[int], lora_ranks: list[int | None] | None = None
    ) -> list[ClientContext]:
        """`client_context` of each of `client_ids` (with its rank from `lora_ranks`), in one
        call: the driver asks for a round's contexts at once, as separate return values
        (`num_returns`), so each worker fetches only its own clients'."""
        ranks = lora_ranks or [None] * len(client_ids)
        return [self.client_context(c, r) for c, r in zip(client_ids, ranks, strict=True)]

    def _base_delta_handle(self) -> tuple[int, Any]:
        """FLoRA: (the rounds merged so far, their merged delta), the delta put in the object
        store once per round so that each client's context carries only its reference."""
        version = max(0, self._round - 1)
        if self._base_handle is None or self._base_handle[0] != version:
            delta = self.strategy.base_delta()
            if delta is not None and ray.is_initialized():
                delta = ray.put(delta)
            self._base_handle = (version, delta)
        return self._base_handle

    def begin_round(self, sample_counts: dict[int, int], round_idx: int = 0) -> None:
        """Prepare for the selected clients; `sample_counts` maps client id to its record count."""
        self._weights = {
            c: (n if self.weighting == "samples" else 1) for c, n in sample_counts.items()
        }
        self._sum = WeightedDeltaSum(
            self.global_adapter, max(1, sum(self._weights.values())), self.fold_threads
        )
        self._units = None
        self._buffer = {}
        self._rejected, self._accepted = {}, []
        self._bytes, self._norms, self._fold_seconds = {}, {}, 0.0
        self._ranks = {}
        self._round = round_idx
        if self.client_states is not None:  # a redone round must not commit a stale stage
            self.client_states.settle(round_idx - 1)
        self.strategy.begin_round(len(sample_counts))
        faults.note(f"begin_round {round_idx}")  # fault tests only

    def begin_step(self, step: int, weights: dict[int, int], units: dict[int, int]) -> None:
        """Asynchronous server step `step` (fedsim.async_rounds), instead of `begin_round`: its
        updates are keyed by dispatch index, `weights` holds each one's integer fold weight
        round(n_i s(tau_i) 2^30) and `units` its n_i 2^30 (`StepWeights.fold_weights`). The mean
        divides by the units of the accepted updates: sum_i n_i s(tau_i) delta_i / sum_j n_j."""
        self.begin_round(dict.fromkeys(weights, 1), step)
        self._weights, self._units = dict(weights), dict(units)
        self._sum = WeightedDeltaSum(
            self.global_adapter, max(1, sum(units.values())), self.fold_threads
        )

    def fold(
        self,
        client_id: int,
        upload: ClientUpload | TensorDict,
        trained_from: TensorDict | None = None,
    ) -> str | None:
        """Add one client's upload; returns the reason if it was rejected, else None.
        `trained_from`: the global adapter the client trained from, when not the current one
        (an asynchronous update is a delta from its own start version)."""
        assert self._sum is not None, "begin_round first"
        if not isinstance(upload, ClientUpload):  # a bare adapter
            upload = ClientUpload(upload)
        start = time.perf_counter()
        self._bytes[client_id] = upload.nbytes()
        self._ranks[client_id] = upload.rank or _global_rank(self.global_adapter)
        try:
            self._fold(client_id, upload, trained_from)
        except UpdateRejected as err:
            self._rejected[client_id] = str(err)
            return str(err)
        finally:
            self._fold_seconds += time.perf_counter() - start
        self._accepted.append(client_id)
        return None

    def fold_batch(
        self,
        client_ids: list[int | None],
        uploads: list[ClientUpload | TensorDict],
        trained_from: TensorDict | None = None,
    ) -> list[str | None]:
        """`fold` each of `uploads` as the update of the client at the same place in
        `client_ids`, skipping the places that hold None (an asynchronous step folds part of a
        batch of uploads; a later step the rest); returns each one's reason for rejection, or
        None. One call for a worker's batch of clients: the fold is exact, so it equals one call
        per client in any order."""
        return [
            self.fold(c, upload, trained_from)
            for c, upload in zip(client_ids, uploads, strict=True)
            if c is not None
        ]

    def _fold(
        self, client_id: int, upload: ClientUpload, trained_from: TensorDict | None = None
    ) -> None:
        plain = upload.encoding == "raw" and upload.rank is None and trained_from is None
        if plain and self.client_states is None and self.clip_norm is None and not self.buffered:
            # the common case: the trained adapter itself, folded in one checked streaming pass
            self._sum.add(upload.tensors, self._weights[client_id])  # type: ignore[union-attr]
            return
        reference = self.global_adapter if trained_from is None else trained_from
        delta = decode_upload(upload, reference, self.block_size)
        if self.clip_norm is not None:
            delta, self._norms[client_id] = clip_delta(delta, self.clip_norm)
        state: TensorDict = {}
        if self.client_states is not None:
            state = self.strategy.client_state_of(upload, self.global_adapter)
            # folds the state's change first: it validates before it accumulates anything
            old = self.client_states.load(client_id)
            self.strategy.fold_client_state(old, state)
        if self.buffered:
            self._buffer[client_id] = delta
        else:
            self._sum.add_delta(delta, self._weights[client_id])  # type: ignore[union-attr]
        if self.client_states is not None:
            self.client_states.stage(client_id, self._round, state)

    def _round_delta(self, notes: dict[str, Any]) -> TensorDict | None:
        """The round's aggregated delta, or None when nothing may be applied."""
        assert self._sum is not None
        if self.buffered:
            ids = sorted(self._buffer)
            need = min_updates(self.robust.rule, self.robust.num_byzantine, self.robust.trim_beta)
            if len(ids) < need:
                notes["robust_refused"] = (
                    f"{self.robust.rule} needs at least {need} updates "
                    f"(num_byzantine={self.robust.num_byzantine}), got {len(ids)}"
                )
                return None
            delta, details = robust_aggregate(
                self.robust.rule,
                [self._buffer[c] for c in ids],
                self.robust.num_byzantine,
                self.robust.trim_beta,
                self.robust.multi_krum_m,
            )
            if "chosen" in details:
                details["chosen"] = [ids[i] for i in details["chosen"]]
            notes["robust"] = {"rule": self.robust.rule, **details}
            return delta
        if not self._sum.count:
            return None
        if self._units is not None:  # an asynchronous step: c_i = n_i s(tau_i) / sum_j n_j
            return self._sum.mean(denominator=sum(self._units[c] for c in self._accepted))
        if not self.dp.enabled:
            return self._sum.mean()
        k = len(self._weights)  # fixed weights 1/k: a missing client contributes zero
        std = self.dp.noise_multiplier * self.dp.clip_norm / k
        noise = gaussian_noise(self.global_adapter, std, self.seed, self._round)
        return {key: d + noise[key] for key, d in self._sum.mean(denominator=k).items()}

    def finish_round(
        self, round_idx: int, info: dict[str, Any], trained: TrainedRound | None = None
    ) -> tuple[dict[str, Any], TensorDict]:
        """Apply the strategy, start writing the round checkpoint, and return (summary, new
        adapter); `summary["checkpoints_written"]` lists the checkpoints that became durable
        during this call (see `flush`). With the driver's part of the round's record, `trained`,
        the complete `RoundRecord` heads round.json and is returned as `summary["record"]`.

        With no accepted update (or too few for a robust rule) the previous global adapter is
        kept, and round.json says so.
        """
        assert self._sum is not None, "begin_round first"
        written = self._await_pending()  # the previous round's checkpoint, if still going
        notes: dict[str, Any] = {}
        if self.strategy.aggregates_products:
            ids = sorted(self._buffer)
            applied = bool(ids)
            if applied:
                self.global_adapter = self.strategy.apply_products(
                    self.global_adapter,
                    [self._buffer[c] for c in ids],
                    [self._weights[c] for c in ids],
                    round_idx,
                )
        else:
            delta = self._round_delta(notes)
            applied = delta is not None
            if delta is not None:
                self.global_adapter = self.strategy.apply(self.global_adapter, delta)
        summary = {**info, **self._summary(applied, notes), **self.provenance}
        if self.dp.enabled:
            summary["dp"] = self._dp_summary(round_idx)
        record = self._record(trained, summary) if trained is not None else None
        if record is not None:  # the record heads round.json
            summary = {**record.to_json(), **summary}
        # a snapshot: the strategy's state tensors change in place as the next round folds in
        state = {k: v.clone() for k, v in self.strategy.state_dict().items()}
        adapter = self.global_adapter  # replaced, never changed in place, by the next round
        if self.overlap:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
            self._pending = self._writer.submit(self._write, round_idx, adapter, state, {**summary})
        else:
            done = self._write(round_idx, adapter, state, summary)
            written.append({**done, "checkpoint_wait_seconds": done["checkpoint_seconds"]})
        summary["checkpoints_written"] = written
        if record is not None:
            summary["record"] = record.to_json()
        self._sum, self._buffer = None, {}
        return summary, self.global_adapter

    def _summary(self, applied: bool, notes: dict[str, Any]) -> dict[str, Any]:
        """round.json's account of the aggregation: weights, rejections, bytes, where it ran."""
        aggregation: dict[str, Any] = {
            "strategy": self.strategy.name,
            "weighting": self.weighting,
            "weights": {str(c): self._weights[c] for c in sorted(self._accepted)},
            "accepted": sorted(self._accepted),
            "rejected": {str(c): why for c, why in sorted(self._rejected.items())},
            "kept_previous_adapter": not applied,
            "fold_seconds": round(self._fold_seconds, 6),
            # the LoRA rank each client trained and uploaded (HetLoRA, FlexLoRA)
            "ranks": {str(c): r for c, r in sorted(self._ranks.items())},
            **notes,
        }
        if self.clip_norm is not None:
            aggregation["clip_norm"] = self.clip_norm
            aggregation["update_norms"] = {str(c): n for c, n in sorted(self._norms.items())}
        sizes = {
            "adapter": adapter_nbytes(self.global_adapter),
            "uplink": sum(self._bytes.values()),
            "uplink_by_client": {str(c): b for c, b in sorted(self._bytes.items())},
        }
        if self.strategy.merges_into_base and applied:
            # what a client of the next round downloads on top of the adapter to merge this
            # round's update into its base: the stacked factors, of rank sum_i r_i
            stacked_rank = sum(self._ranks[c] for c in self._accepted)
            sizes["merged_stack"] = stacked_rank * _bytes_per_rank(self.global_adapter)
        return {
            "aggregation": aggregation,
            "aggregator": f"{socket.gethostname()}:{os.getpid()}",
            "aggregator_peak_rss_mb": peak_rss_mb(),
            "bytes": sizes,
        }

    def _dp_summary(self, round_idx: int) -> dict[str, Any]:
        """The privacy figures of the rounds so far (round.json's `dp`)."""
        return {
            "epsilon": dp_epsilon(
                self.dp.noise_multiplier,
                round_idx,
                self.dp.delta,
                self.num_clients,
                self.dp_per_round,
            ),
            "delta": self.dp.delta,
            "noise_multiplier": self.dp.noise_multiplier,
            "clip_norm": self.dp.clip_norm,
            "clients_per_round": len(self._weights),
            "sampling": (
                f"{self.dp_per_round} of {self.num_clients} without replacement"
                if self.dp_per_round
                else "none (every round counted in full)"
            ),
            "rounds": round_idx,
        }

    def _record(self, trained: TrainedRound, summary: dict[str, Any]) -> RoundRecord:
        aggregation = summary["aggregation"]
        return RoundRecord(
            **dataclasses.asdict(trained),
            uplink_bytes=summary["bytes"]["uplink"],
            rejected=aggregation["rejected"],
            aggregator_peak_rss_mb=summary["aggregator_peak_rss_mb"],
            kept_previous_adapter=aggregation["kept_previous_adapter"],
            epsilon=summary["dp"]["epsilon"] if "dp" in summary else None,
        )

    def flush(self) -> list[dict[str, Any]]:
        """Wait for the checkpoint being written, if any; returns what became durable: a list of
        at most one `{"round", "checkpoint_seconds", "checkpoint_wait_seconds"}`. Raises the
        write's CheckpointWriteError."""
        faults.note("flush")  # fault tests only: the driver has no round left to start
        return self._await_pending()

    def _await_pending(self) -> list[dict[str, Any]]:
        if self._pending is None:
            return []
        start = time.perf_counter()
        pending, self._pending = self._pending, None
        done = pending.result()
        done["checkpoint_wait_seconds"] = round(time.perf_counter() - start, 6)
        return [done]

    def _write(
        self,
        round_idx: int,
        adapter: TensorDict,
        state: TensorDict,
        summary: dict[str, Any],
    ) -> dict[str, Any]:
        exit_if_aggregator_fault(round_idx, "exit_before_checkpoint")  # fault tests only
        start = time.perf_counter()
        config = self.adapter_config
        checkpoint.write_round(self.run_dir, round_idx, adapter, config, state, summary)
        done: dict[str, Any] = {"round": round_idx}
        if self.client_states is not None:
            done["client_states_written"] = self.client_states.commit(round_idx)
        done["checkpoint_seconds"] = round(time.perf_counter() - start, 6)
        return done


def _bytes_per_rank(adapter: TensorDict) -> int:
    """The bytes one rank adds to an adapter: a row of every lora_A, a column of every lora_B."""
    a = sum(v.shape[1] * v.element_size() for k, v in adapter.items() if is_lora_a(k))
    b = sum(v.shape[0] * v.element_size() for k, v in adapter.items() if is_lora_b(k))
    return a + b


def _global_rank(adapter: TensorDict) -> int:
    """The rank of the global adapter (rows of any lora_A; 0 for an adapter without one)."""
    return next((v.shape[0] for k, v in adapter.items() if "lora_A" in k), 0)
