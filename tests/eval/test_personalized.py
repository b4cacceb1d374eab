"""Personalized evaluation (`fedsim eval RUN_DIR --personalized`) on one real FedSA-LoRA run with
per-client held-out slices and a lower-rank client, trained once for the module; the personal
model's loss is checked against the round loaded with PEFT as docs/lora-native.md shows."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedsim import checkpoint
from fedsim.cli import main
from fedsim.data.pipeline import load_table
from fedsim.data.shards import IGNORE_INDEX, ShardStore, tokenize_records
from fedsim.data.templates import get_template
from fedsim.eval.job import open_run
from fedsim.eval.personalized import (
    GLOBAL,
    OWN_B,
    evaluate_personalized,
    read_result,
    result_path,
    summarize_model,
    worst_decile,
)
from fedsim.lora_ranks import pad_adapter
from fedsim.model import load_tokenizer
from fedsim.prepare import prepare_model
from fedsim.server.client_state import ClientStateStore
from tests.conftest import tiny_experiment


def test_worst_decile_is_the_mean_of_the_worst_tenth_at_least_one() -> None:
    losses = [float(x) for x in range(1, 21)]  # 20 clients: the worst two are 20 and 19

    assert worst_decile(losses) == 19.5
    assert worst_decile(losses, worst_is_high=False) == 1.5  # exact match: the lowest
    assert worst_decile([3.0, 1.0, 2.0]) == 3.0  # 10% of 3 rounds up to one client
    assert worst_decile([]) is None


def test_summary_counts_each_client_once_whatever_its_size() -> None:
    per_client = {
        "0": {"loss": 1.0, "exact_match": 1.0, "records": 100},
        "1": {"loss": 3.0, "exact_match": 0.0, "records": 1},
    }

    summary = summarize_model(per_client)

    assert summary == {
        "mean_loss": 2.0,
        "worst_decile_loss": 3.0,
        "mean_exact_match": 0.5,
        "worst_decile_exact_match": 0.0,
    }


@pytest.fixture(scope="module")
def fedsa_run(ray_local, tmp_path_factory) -> Path:
    """FedSA-LoRA, 2 rounds, 6 clients (client 1 at rank 2), a quarter of each client's records
    held out."""
    from fedsim.config import config_from_dict
    from fedsim.driver import run_experiment

    tmp = tmp_path_factory.mktemp("personalized")
    profile = tmp / "profile.yaml"
    profile.write_text("classes: {small: {lora_rank: 2}}\nclients: {1: small}\n")
    raw = tiny_experiment(
        tmp,
        run={"name": "fedsa", "rounds": 2},
        data={"test_per_client": 0.25, "test_per_category": 2},
        server={"strategy": "fedsa_lora"},
        client={"profile": str(profile)},
        eval={"generation": {"max_new_tokens": 6}},
        cluster={"num_workers": 1},  # one worker process to start: the fixture's run takes ~12 s
    )
    return run_experiment(config_from_dict(raw), log=lambda _: None, show_progress=False).run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def _peft_loss(run_dir: Path, round_idx: int, client: int, own_b: dict | None) -> float:
    """Token-weighted answer loss of `client`'s slice under the round's adapter loaded with PEFT
    (and the client's own B substituted, as docs/lora-native.md shows), computed here from the
    logits."""
    run = open_run(run_dir)
    cfg = run.cfg
    model_path = prepare_model(cfg, log=lambda _: None)
    round_dir = run_dir / checkpoint.ROUNDS_DIR / checkpoint.round_name(round_idx)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), round_dir)
    adapter = load_file(str(round_dir / "adapter_model.safetensors"))
    if own_b is not None:
        padded = pad_adapter(own_b, {k: adapter[k] for k in own_b})
        set_peft_model_state_dict(model, {**adapter, **padded})
    model.eval()
    wanted = json.loads((run_dir / "partition.json").read_text())["test_per_client"]["clients"]
    table, _ = load_table(cfg.data)
    rows = table.take(wanted[str(client)]["source_index"])  # built-in data: index == row
    template, tokenizer = get_template(cfg.data.template), load_tokenizer(model_path)
    ids, labels = tokenize_records(rows, tokenizer, template, cfg.data.cutoff_len, False)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for x, y in zip(ids, labels, strict=True):
            logits = model(input_ids=torch.tensor([x])).logits[0, :-1]
            target = torch.tensor(y[1:])
            kept = target != IGNORE_INDEX
            loss_sum += float(F.cross_entropy(logits[kept], target[kept], reduction="sum"))
            tokens += int(kept.sum())
    return loss_sum / tokens


def test_each_client_is_scored_with_its_own_b_and_the_global_model(
    fedsa_run: Path, tmp_path: Path
) -> None:
    run_dir = _copy(fedsa_run, tmp_path)

    assert main(["eval", str(run_dir), "--personalized"]) == 0

    result = read_result(result_path(open_run(run_dir), 2))
    assert set(result["models"]) == {GLOBAL, OWN_B}
    # the clients trained on their records less their slices: the shards hold no more
    partition = json.loads((run_dir / "partition.json").read_text())
    shards = ShardStore(run_dir / "shards")
    for c in range(6):
        held = partition["test_per_client"]["clients"][str(c)]["records"]
        assert shards.num_records(c) == partition["clients"][str(c)]["records"]
        assert result["models"][GLOBAL]["clients"][str(c)]["records"] == held > 0
    train = sum(partition["clients"][str(c)]["records"] for c in range(6))
    held = partition["test_per_client"]["records"]
    assert train + held + partition["test"]["records"] == partition["num_records"]
    store = ClientStateStore(run_dir)
    trained = [c for c in range(6) if store.path(c).exists()]
    assert 0 < len(trained) < 6  # 3 of 6 clients a round for 2 rounds: some never trained
    own, glob = result["models"][OWN_B]["clients"], result["models"][GLOBAL]["clients"]
    for c in range(6):
        assert own[str(c)]["own_b"] == (c in trained)
        if c not in trained:  # a client that never trained would use the global adapter
            assert own[str(c)]["loss"] == glob[str(c)]["loss"]
    # the figures are those of the checkpoint loaded with PEFT, outside fedsim's eval code
    some = trained[0]
    assert own[str(some)]["loss"] == pytest.approx(
        _peft_loss(run_dir, 2, some, store.load(some)), rel=1e-5
    )
    assert glob[str(some)]["loss"] == pytest.approx(_peft_loss(run_dir, 2, some, None), rel=1e-5)
    assert own[str(some)]["loss"] != glob[str(some)]["loss"]
    # the lower-rank client's own B has rank 2 and was padded to the adapter's 4
    assert 1 not in trained or next(iter(store.load(1).values())).shape[1] == 2
    losses = [glob[str(c)]["loss"] for c in range(6)]
    assert result["models"][GLOBAL]["mean_loss"] == pytest.approx(sum(losses) / 6)
    assert result["models"][GLOBAL]["worst_decile_loss"] == max(losses)
    assert all(0 <= glob[str(c)]["exact_match"] <= 1 for c in range(6))  # built-in: exact


def test_finetune_baseline_is_seeded_and_adds_to_the_rounds_result(
    fedsa_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy(fedsa_run, tmp_path)
    run = open_run(run_dir)

    first = evaluate_personalized(run, 2, finetune_steps=2, log=lambda _: None)
    tuned = first["models"]["finetune_2"]["clients"]
    again = evaluate_personalized(open_run(run_dir), 2, finetune_steps=2, log=print)

    assert again["models"]["finetune_2"]["clients"] == {
        c: {**v, "train_seconds": again["models"]["finetune_2"]["clients"][c]["train_seconds"]}
        for c, v in tuned.items()
    }  # the same steps from the same stream: the same scores
    glob = first["models"][GLOBAL]["clients"]
    assert all(math.isfinite(tuned[c]["train_loss"]) for c in tuned)
    assert any(tuned[c]["loss"] != glob[c]["loss"] for c in tuned)
    printed = capsys.readouterr().out
    assert "finetune_2 loss" in printed and "worst decile" in printed
    # one file per round; a call without fine-tuning keeps the fine-tune's figures
    evaluate_personalized(open_run(run_dir), 2, log=lambda _: None)
    assert set(read_result(result_path(run, 2))["models"]) == {GLOBAL, OWN_B, "finetune_2"}


def test_refusals_exit_2_naming_the_problem(
    fedsa_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy(fedsa_run, tmp_path)

    # clients/ holds each client's latest B only: round 1 cannot be personalized any more
    assert main(["eval", str(run_dir), "--personalized", "--round", "1"]) == 2
    assert "holds client" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--finetune-steps", "3"]) == 2
    assert "--personalized" in capsys.readouterr().err

    partition = json.loads((run_dir / "partition.json").read_text())
    del partition["test_per_client"]  # as a run without data.test_per_client has it
    (run_dir / "partition.json").write_text(json.dumps(partition))
    assert main(["eval", str(run_dir), "--personalized"]) == 2
    assert "data.test_per_client" in capsys.readouterr().err
    assert not result_path(open_run(run_dir), 2).exists()
