"""The one local-training loop (`Trainer.train`), through every backend, on a tiny model built
in the test; its pure parts (steps, batch order, collation, lr schedules) without a model."""

import math

import numpy as np
import pytest
import torch

from fedsim.client.trainer import IGNORE_INDEX, batch_order, collate, lr_factor
from fedsim.model import get_adapter
from tests.client.conftest import settings as _settings
from tests.conftest import same_bits


def _examples(n: int = 12) -> tuple[list[list[int]], list[list[int]]]:
    """A copy task: the answer repeats the prompt; prompt tokens are masked."""
    rng = np.random.default_rng(0)
    ids, labels = [], []
    for _ in range(n):
        prompt = rng.integers(3, 40, size=4).tolist()
        ids.append([1, *prompt, *prompt, 2])
        labels.append([IGNORE_INDEX] * 5 + [*prompt, 2])
    return ids, labels


def test_training_lowers_the_loss_and_touches_only_lora(tiny):
    t = tiny(_settings(local_steps=30), vocab_size=40, lora_seed=0)
    start = get_adapter(t.model)
    frozen = {k: v.clone() for k, v in t.model.state_dict().items() if "lora_" not in k}
    ids, labels = _examples()
    adapter, result = t.train(start, ids, labels, seed=3)
    assert len(result.losses) == 30 and result.examples == 30 * 4
    assert result.tokens == 30 * 4 * 10 and result.lr_sum == pytest.approx(30 * 1e-2)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert any(not torch.equal(start[k], v) for k, v in adapter.items())
    for k, v in t.model.state_dict().items():
        if k in frozen:
            assert torch.equal(frozen[k], v), k


def test_same_seed_same_update_whatever_ran_before(tiny):
    t = tiny(_settings(local_steps=5), vocab_size=40, lora_seed=0)
    start = get_adapter(t.model)
    ids, labels = _examples()
    first, _ = t.train(start, ids, labels, seed=1)
    t.train(first, ids[:6], labels[:6], seed=9)  # some other client in between
    again, _ = t.train(start, ids, labels, seed=1)
    assert all(same_bits(first[k], again[k]) for k in first)
    other, _ = t.train(start, ids, labels, seed=2)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_micro_batches_without_labels_add_nothing(tiny):
    """Answers cut off by cutoff_len leave micro-batches without a label: they count no tokens
    and no loss, yet the step still happens."""
    t = tiny(_settings(local_steps=4), vocab_size=40, lora_seed=0)
    start = get_adapter(t.model)
    ids, labels = _examples(4)
    cut = [[IGNORE_INDEX] * len(x) for x in ids]
    # two labelled examples, two cut off: some micro-batches hold only cut-off ones
    adapter, result = t.train(start, ids, labels[:2] + cut[2:], seed=0)
    assert len(result.losses) == 4 and result.tokens < 4 * 4 * 10
    assert all(math.isfinite(x) for x in result.losses)
    assert any(not torch.equal(start[k], v) for k, v in adapter.items())
    _, nothing = t.train(start, ids, cut, seed=0)
    assert nothing.tokens == 0 and nothing.losses == [0.0] * 4


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
