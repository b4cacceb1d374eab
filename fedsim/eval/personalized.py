"""Personalized evaluation (`fedsim eval RUN_DIR --personalized`): every client scored on its own
held-out slice (`data.test_per_client`) with the model it would use.

The models, per client, at one round:

- `global`: the round's global adapter (what `fedsim eval` scores), on every client's slice;
- `own_b` (FedSA-LoRA runs): the global A with the client's own B from `clients/<id>.safetensors`
  (a client that never trained has none and uses the global adapter, as it would);
- `finetune_K` (with `--finetune-steps K`): "FedAvg + local fine-tune", the round's global adapter
  tuned for K local steps on the client's own training records, with the run's `client.*`
  settings, its LoRA rank and (FFA-LoRA) frozen A, seeded by stream FINETUNE (round, client).

Each client's score is the token-weighted loss of its slice's reference answers and, where the
answers have one right form (`eval.exact_match`, the built-in data), the exact match of greedy
answers. Per model: the per-client figures, their mean over clients (each client counts once) and
the worst decile (the mean of the worst 10% of clients, at least one). The result goes to
`rounds/round_N/eval/personalized.json`; a later call for another model of the same round adds
to it.

Everything runs in this process, on the model `fedsim eval` loads, with the trainer the workers
use (`TorchTrainer`: on CPU in fp32 the DeepSpeed backend gives the same adapters bit for bit).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors import safe_open

from fedsim import rundir
from fedsim.client.trainer import TorchTrainer, TrainSettings
from fedsim.data.pipeline import PreparedData, prepare_data
from fedsim.data.profiles import load_profiles
from fedsim.data.shards import tokenize_records
from fedsim.errors import FedsimInputError
from fedsim.eval.generation import AnswerModel
from fedsim.eval.job import EVAL_DIR, EvalRun, ModelPool, _locked, latest_round, load_adapter
from fedsim.eval.metrics import exact_match
from fedsim.eval.questions import Question, answers_are_exact, record_questions
from fedsim.lora_ranks import BASE_DELTA_PREFIX, pad_adapter
from fedsim.protocol import ClientContext
from fedsim.seeds import Stream, seed_of
from fedsim.server.client_state import ClientStateStore

Log = Callable[[str], None]
TensorDict = dict[str, torch.Tensor]
RESULT_FILE = "personalized.json"
"""Under `rounds/round_N/eval/`."""
GLOBAL = "global"
OWN_B = "own_b"
PRINTED_CLIENTS = 50
"""Above this many clients the printed table shows the summary rows only."""


def _print(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------
# Inputs: the run's per-client slices, checked against partition.json
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientData:
    """One client's held-out questions and the row positions of its training records."""

    client_id: int
    questions: tuple[Question, ...]
    train_rows: np.ndarray


def client_data(run: EvalRun) -> tuple[PreparedData, list[ClientData]]:
    """Every client's slice and training records, rebuilt from the run's config and checked
    against its partition.json; a run without slices is an input error."""
    path = run.run_dir / "partition.json"
    try:
        partition = json.loads(path.read_text())
    except (OSError, ValueError):
        raise FedsimInputError(f"{path}: missing or unreadable") from None
    if "test_per_client" not in partition:
        raise FedsimInputError(
            f"--personalized: {run.run_dir} has no per-client held-out slices "
            "(data.test_per_client is 0); train a run with --set data.test_per_client=0.2"
        )
    data = prepare_data(run.cfg.data, run.cfg.run.seed)
    if data.partition_hash() != partition.get("partition_hash"):
        raise FedsimInputError(
            f"data.source: the records or their partition differ from {path}; "
            "personalized evaluation needs the data the run was trained on"
        )
    exact = answers_are_exact(run.cfg)
    clients = []
    for cid, (train, held) in enumerate(zip(data.clients, data.client_test, strict=True)):
        rows = data.table.take(pa.array(held, type=pa.int64())).to_pylist()
        clients.append(ClientData(cid, record_questions(rows, f"client{cid}", exact), train))
    return data, clients


# ------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------


def score_client(
    model: AnswerModel, run: EvalRun, client: ClientData, with_exact: bool
) -> dict[str, Any]:
    """Loss (token-weighted over the slice) and, when asked, exact match of the model as it is
    now on one client's slice."""
    cfg = run.cfg
    losses = model.response_loss(
        client.questions, run.template, cfg.data.cutoff_len, cfg.eval.generation.batch_size
    )
    tokens = sum(x.tokens for x in losses)
    out: dict[str, Any] = {
        "records": len(client.questions),
        "loss": sum(x.loss_sum for x in losses) / tokens if tokens else None,
        "tokens": tokens,
    }
    if with_exact:
        answers = model.answer(client.questions, run.template, cfg.eval.generation)
        hits = [
            exact_match(a.answers[0], q.references[0])
            for q, a in zip(client.questions, answers, strict=True)
        ]
        out["exact_match"] = sum(hits) / len(hits)
    return out


def worst_decile(values: Sequence[float], worst_is_high: bool = True) -> float | None:
    """Mean of the worst 10% of `values` (at least one): the highest when `worst_is_high`."""
    if not values:
        return None
    k = max(1, math.ceil(0.1 * len(values)))
    ordered = sorted(values, reverse=worst_is_high)
    return sum(ordered[:k]) / k


def summarize_model(per_client: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean over clients (each counts once) and worst decile of loss and exact match."""
    out: dict[str, Any] = {}
    for key, worst_is_high in (("loss", True), ("exact_match", False)):
        values = [c[key] for c in per_client.values() if c.get(key) is not None]
        if values:
            out[f"mean_{key}"] = sum(values) / len(values)
            out[f"worst_decile_{key}"] = worst_decile(values, worst_is_high)
    return out


# ------------------------------------------------------------------------------------------
# The models each client would use
# ------------------------------------------------------------------------------------------


def check_own_b_rounds(store: ClientStateStore, round_idx: int) -> None:
    """FedSA-LoRA: refuse `round_idx` when a client's kept B was written after it: clients/
    holds each client's latest B only, not the one it had at that round. Reads metadata only."""
    for path in sorted(store.dir.glob("*.safetensors")) if store.dir.is_dir() else []:
        with safe_open(str(path), "pt") as f:
            written = int((f.metadata() or {}).get("round", "0"))
        if written > round_idx:
            raise FedsimInputError(
                f"--round {round_idx}: {path} holds client {path.stem}'s B as of round "
                f"{written}; clients/ keeps each client's latest B only, so score a round at or "
                "after the last one any client trained in (the latest round)"
            )


def own_b_adapter(
    store: ClientStateStore, client_id: int, adapter: TensorDict
) -> TensorDict | None:
    """FedSA-LoRA: `adapter` with the client's own B (zero-padded to the adapter's rank), or
    None when the client never trained."""
    own = store.load(client_id)
    if own is None:
        return None
    return {**adapter, **pad_adapter(own, {k: adapter[k] for k in own})}


class FineTuner:
    """ "FedAvg + local fine-tune": K local steps of the run's client settings from the round's
    global adapter, on one client's training records, with the trainer the workers use."""

    def __init__(self, run: EvalRun, model: AnswerModel, steps: int) -> None:
        cfg = run.cfg
        self.run, self.model, self.steps = run, model, steps
        client = dataclasses.replace(cfg.client, local_steps=steps, local_epochs=None)
        pad = model.tokenizer.pad_token_id
        self.trainer = TorchTrainer(TrainSettings(client, pad_token_id=pad or 0))
        self.ranks: list[int | None] = [None] * cfg.data.num_clients
        if cfg.client.profile:
            profiles = load_profiles(cfg.client.profile, cfg.data.num_clients, cfg.model.lora.r)
            self.ranks = [p.lora_rank for p in profiles]

    def tune(self, table: pa.Table, client: ClientData, round_idx: int) -> dict[str, Any]:
        """Train the model's adapter (the global one, already in place) on the client's records;
        returns the fine-tune's figures."""
        cfg = self.run.cfg
        records = table.take(pa.array(client.train_rows, type=pa.int64()))
        input_ids, labels = tokenize_records(
            records,
            self.model.tokenizer,
            self.run.template,
            cfg.data.cutoff_len,
            cfg.data.train_on_inputs,
        )
        context = ClientContext(
            lora_rank=self.ranks[client.client_id],
            freeze_lora_a=cfg.server.strategy == "ffa_lora",
        )
        seed = seed_of(cfg.run.seed, Stream.FINETUNE, round_idx, client.client_id)
        result = self.trainer.train(self.model.model, input_ids, labels, seed, context)
        return {"train_loss": result.mean_loss, "train_seconds": round(result.seconds, 3)}


# ------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------


def evaluate_personalized(
    run: EvalRun,
    round_idx: int | None = None,
    finetune_steps: int = 0,
    log: Log = _print,
) -> dict[str, Any]:
    """Score every client of round `round_idx` (None: the latest) with the global model and
    the model it would use; write and return the round's personalized.json content."""
    cfg = run.cfg
    if round_idx is None:
        round_idx = latest_round(run.run_dir)
        if round_idx == 0:
            raise FedsimInputError(f"{run.run_dir} has no complete round to evaluate yet")
    if finetune_steps < 0:
        raise FedsimInputError(f"--finetune-steps: expected a number >= 0, got {finetune_steps}")
    adapter, adapter_sha = load_adapter(run, round_idx)
    data, clients = client_data(run)
    fedsa = cfg.server.strategy == "fedsa_lora"
    store = ClientStateStore(run.run_dir)
    if fedsa:  # before any model is loaded
        check_own_b_rounds(store, round_idx)
    torch.set_num_threads(cfg.eval.num_threads)
    model = ModelPool().get(cfg)
    with_exact = any(q.exact for c in clients for q in c.questions)
    lora = {k: v for k, v in adapter.items() if not k.startswith(BASE_DELTA_PREFIX)}

    models: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    model.use_adapter(adapter)
    models[GLOBAL] = _model_entry(
        "the round's global adapter",
        {str(c.client_id): score_client(model, run, c, with_exact) for c in clients},
        start,
    )
    if fedsa:
        start = time.perf_counter()
        per_client = {}
        for c in clients:
            own = own_b_adapter(store, c.client_id, lora)
            model.use_adapter(adapter if own is None else {**adapter, **own})
            per_client[str(c.client_id)] = {
                **score_client(model, run, c, with_exact),
                "own_b": own is not None,
            }
        models[OWN_B] = _model_entry(
            "the global A with the client's own B (clients/<id>.safetensors)", per_client, start
        )
    if finetune_steps:
        start = time.perf_counter()
        tuner = FineTuner(run, model, finetune_steps)
        per_client = {}
        for c in clients:
            model.use_adapter(adapter)  # every client starts from the round's global adapter
            figures = tuner.tune(data.table, c, round_idx)
            per_client[str(c.client_id)] = {**score_client(model, run, c, with_exact), **figures}
        models[f"finetune_{finetune_steps}"] = _model_entry(
            f"the global adapter after {finetune_steps} local steps on the client's own records",
            per_client,
            start,
        )
    model.use_adapter(adapter)  # leave the pooled model as the round has it

    result = _write(run, round_idx, adapter_sha, models)
    log(format_table(result, list(models)))
    return result


def _model_entry(what: str, per_client: dict[str, dict[str, Any]], start: float) -> dict[str, Any]:
    return {
        "what": what,
        **summarize_model(per_client),
        "seconds": round(time.perf_counter() - start, 3),
        "clients": per_client,
    }


def result_path(run: EvalRun, round_idx: int) -> Path:
    return run.round_dir(round_idx) / EVAL_DIR / RESULT_FILE


def read_result(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(
    run: EvalRun, round_idx: int, adapter_sha: str, models: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Merge `models` into the round's personalized.json (models scored earlier on the same
    adapter are kept) and write it atomically."""
    eval_dir = rundir.make_dir(run.round_dir(round_idx) / EVAL_DIR)
    with _locked(eval_dir):
        current = read_result(eval_dir / RESULT_FILE)
        if current.get("adapter_sha256") != adapter_sha:
            current = {}  # the results of an older adapter of a redone round
        current.update(
            {
                "round": round_idx,
                "adapter_sha256": adapter_sha,
                "strategy": run.cfg.server.strategy,
                "test_per_client": run.cfg.data.test_per_client,
            }
        )
        current.setdefault("models", {}).update(models)
        rundir.write_text_atomic(eval_dir / RESULT_FILE, json.dumps(current, indent=1))
    return current


def _cell(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def format_table(result: dict[str, Any], names: list[str] | None = None) -> str:
    """The short table `fedsim eval --personalized` prints: per client, then mean and worst
    decile, one loss (and exact-match) column per model."""
    models = result["models"]
    names = names or list(models)
    with_exact = any("mean_exact_match" in models[n] for n in names)
    header = f"{'client':>12} {'records':>7}" + "".join(f" {n + ' loss':>16}" for n in names)
    if with_exact:
        header += "".join(f" {n + ' exact':>16}" for n in names)
    first = models[names[0]]["clients"]
    lines = [
        f"round {result['round']} personalized ({result['strategy']}, {len(first)} clients, "
        f"{sum(c['records'] for c in first.values())} held-out records)",
        header,
    ]

    def row(label: str, records: str, loss_key: Callable[[dict], Any], em_key: Callable) -> str:
        text = f"{label:>12} {records:>7}" + "".join(
            f" {_cell(loss_key(models[n]), '.4f'):>16}" for n in names
        )
        if with_exact:
            text += "".join(f" {_cell(em_key(models[n]), '.3f'):>16}" for n in names)
        return text

    if len(first) <= PRINTED_CLIENTS:
        for cid, c in first.items():
            lines.append(
                row(
                    cid,
                    str(c["records"]),
                    lambda m, cid=cid: m["clients"][cid].get("loss"),
                    lambda m, cid=cid: m["clients"][cid].get("exact_match"),
                )
            )
    lines.append(row("mean", "", lambda m: m.get("mean_loss"), lambda m: m.get("mean_exact_match")))
    lines.append(
        row(
            "worst decile",
            "",
            lambda m: m.get("worst_decile_loss"),
            lambda m: m.get("worst_decile_exact_match"),
        )
    )
    return "\n".join(lines)
