"""The torch trainer on a tiny model built in the test."""

import math

import numpy as np
import pytest
import torch

from fedsim.client.trainer import (
    IGNORE_INDEX,
    TorchTrainer,
    TrainSettings,
    batch_order,
    collate,
    lr_factor,
)
from fedsim.model import get_adapter, set_adapter
from tests.conftest import tiny_lora_llama


@pytest.fixture(scope="module")
def model():
    return tiny_lora_llama(vocab_size=40, lora_seed=0)


def _examples(n: int = 12) -> tuple[list[list[int]], list[list[int]]]:
    """A copy task: the answer repeats the prompt; prompt tokens are masked."""
    rng = np.random.default_rng(0)
    ids, labels = [], []
    for _ in range(n):
        prompt = rng.integers(3, 40, size=4).tolist()
        ids.append([1, *prompt, *prompt, 2])
        labels.append([IGNORE_INDEX] * 5 + [*prompt, 2])
    return ids, labels


def _settings(**kw) -> TrainSettings:
    base = {"local_steps": 30, "local_epochs": None, "batch_size": 4, "micro_batch_size": 2}
    return TrainSettings(**{**base, "lr": 1e-2, **kw})


def test_training_lowers_the_loss_and_touches_only_lora(model):
    start = get_adapter(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    ids, labels = _examples()
    result = TorchTrainer(_settings()).train(model, ids, labels, seed=3)
    assert len(result.losses) == 30 and result.examples == 30 * 4
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert any(not torch.equal(start[k], v) for k, v in get_adapter(model).items())
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(frozen[k], v), k
    set_adapter(model, start)


def test_same_seed_same_update_whatever_ran_before(model):
    start = get_adapter(model)
    ids, labels = _examples()
    trainer = TorchTrainer(_settings(local_steps=5))
    trainer.train(model, ids, labels, seed=1)
    first = get_adapter(model)
    set_adapter(model, start)
    trainer.train(model, ids[:6], labels[:6], seed=9)  # some other client in between
    set_adapter(model, start)
    trainer.train(model, ids, labels, seed=1)
    again = get_adapter(model)
    assert all(torch.equal(first[k], again[k]) for k in first)
    set_adapter(model, start)


def test_steps_from_epochs():
    s = _settings(local_steps=None, local_epochs=2.0, batch_size=4)
    assert s.num_steps(10) == math.ceil(2 * 10 / 4)
    assert s.accumulation == 2


def test_batch_order_covers_the_shard_before_repeating():
    order = batch_order(5, 12, np.random.default_rng(0))
    assert len(order) == 12
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))


def test_collate_pads_right_and_masks_padding():
    batch = collate([[5, 6, 7], [8]], [[IGNORE_INDEX, 6, 7], [8]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize(
    ("scheduler", "step", "expected"),
    [
        ("constant", 7, 1.0),
        ("linear", 0, 1.0),
        ("linear", 5, 0.5),
        ("cosine", 5, 0.5),
        ("cosine", 10, 0.0),
    ],
)
def test_lr_schedules(scheduler, step, expected):
    assert lr_factor(step, 10, scheduler, warmup=0) == pytest.approx(expected)


def test_warmup_ramps_up():
    assert [lr_factor(s, 10, "constant", warmup=4) for s in range(5)] == [0.25, 0.5, 0.75, 1, 1]
