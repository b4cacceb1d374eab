"""Held-out exact match during training: probe selection, per-category means, and batched greedy
decoding that gives each prompt the answer it gets alone."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedsim.data.synthetic import generate_instructions, generic_text
from fedsim.data.templates import get_template
from fedsim.eval.metrics import exact_match_by_category, heldout_exact_match, probe_records
from fedsim.model import train_tiny_tokenizer


def test_probe_records_takes_the_first_of_each_category_in_order() -> None:
    records = [{"category": c, "i": i} for i, c in enumerate("aabacbbc")]

    probe = probe_records(records, per_category=2)

    assert [r["i"] for r in probe] == [0, 1, 2, 4, 5, 7]


def test_exact_match_by_category() -> None:
    records = [
        {"category": "add", "response": "7"},
        {"category": "add", "response": "12"},
        {"category": "parity", "response": "odd"},
    ]

    result = exact_match_by_category(["7", " 13 ", "odd "], records)

    assert result == {"mean": pytest.approx(2 / 3), "by_category": {"add": 0.5, "parity": 1.0}}


def _alone(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor(
        [[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]]
    )
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_batched_answers_are_each_prompts_own_answer() -> None:
    tokenizer = train_tiny_tokenizer(generic_text(300, seed=0), 400, 128)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    template = get_template("plain")
    records = generate_instructions(12, seed=5)  # prompts of different lengths: padding matters
    alone = [
        _alone(model, tokenizer, template.render(r["instruction"], r["context"]), 6)
        for r in records
    ]
    assert len({len(template.render(r["instruction"], r["context"])) for r in records}) > 1
    # the reference answer is the model's own answer for the first half, something else after
    graded = [
        r | {"response": a if i < 6 else a + " x"}
        for i, (r, a) in enumerate(zip(records, alone, strict=True))
    ]

    result = heldout_exact_match(model, tokenizer, template, graded, max_new_tokens=6, batch_size=5)

    assert result["mean"] == pytest.approx(0.5)
    expected = exact_match_by_category([*alone[:6], *(a + "!" for a in alone[6:])], graded)
    assert result["by_category"] == expected["by_category"]
