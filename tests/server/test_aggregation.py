import itertools
import math

import pytest
import torch

from fedsim.errors import UpdateRejected
from fedsim.server.aggregation import (
    DELTA_LIMIT_EXP,
    FOLD_BLOCK,
    FOLD_CHUNK,
    WeightedDeltaSum,
    check_update,
    weighted_mean,
)
from tests.conftest import same_bits


def _adapter(*values: float) -> dict[str, torch.Tensor]:
    return {"a": torch.tensor(values, dtype=torch.float32), "b": torch.tensor([[values[0]]])}


def test_weighted_mean_matches_hand_computation():
    g = _adapter(0.0, 0.0)
    w0, w1, w2 = _adapter(1.0, 2.0), _adapter(4.0, -2.0), _adapter(7.0, 1.0)
    acc = WeightedDeltaSum(g, max_total_weight=6)
    for update, n in [(w0, 1), (w1, 2), (w2, 3)]:
        acc.add(update, n)
    mean = acc.mean()
    # (w0*1 + w1*2 + w2*3) / 6
    assert mean["a"].tolist() == pytest.approx([(1 + 8 + 21) / 6, (2 - 4 + 3) / 6], abs=1e-12)
    assert mean["b"].item() == pytest.approx((1 + 8 + 21) / 6, abs=1e-12)
    assert acc.total_weight == 6 and acc.count == 3


def test_arrival_order_changes_no_bit():
    gen = torch.Generator().manual_seed(0)
    g = {"x": torch.randn(64, 33, generator=gen), "y": torch.randn(7, generator=gen) * 1e-3}
    updates = [
        {k: v + torch.randn(v.shape, generator=gen) * 10.0**-i for k, v in g.items()}
        for i in range(6)
    ]
    weights = [3, 1000, 7, 1, 250, 42]
    results = []
    for order in itertools.islice(itertools.permutations(range(6)), 0, 720, 37):
        acc = WeightedDeltaSum(g, sum(weights))
        for i in order:
            acc.add(updates[i], weights[i])
        results.append(acc.mean())
    for other in results[1:]:
        for k in g:
            assert same_bits(results[0][k], other[k])
    expected = weighted_mean(updates, weights, g)
    for k in g:
        torch.testing.assert_close(results[0][k], expected[k], rtol=0, atol=1e-13)


def test_renormalises_over_the_updates_that_arrived():
    g = _adapter(0.0, 0.0)
    acc = WeightedDeltaSum(g, max_total_weight=10)  # room for clients that never report
    acc.add(_adapter(2.0, 2.0), 2)
    acc.add(_adapter(5.0, 5.0), 1)
    assert acc.mean()["a"].tolist() == pytest.approx([3.0, 3.0])


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"a": torch.zeros(2)}, "keys differ"),
        ({"a": torch.zeros(3), "b": torch.zeros(1, 1)}, "shape"),
        ({"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1, 1)}, "dtype"),
        ({"a": torch.tensor([0.0, float("nan")]), "b": torch.zeros(1, 1)}, "non-finite"),
        ({"a": torch.tensor([0.0, 1e6]), "b": torch.zeros(1, 1)}, "delta"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(update, reason):
    with pytest.raises(UpdateRejected, match=reason):
        check_update(update, _adapter(0.0, 0.0))
    acc = WeightedDeltaSum(_adapter(0.0, 0.0), 5)
    with pytest.raises(UpdateRejected):
        acc.add(update, 1)
    assert acc.count == 0


def test_weight_beyond_the_round_bound_is_refused():
    acc = WeightedDeltaSum(_adapter(0.0, 0.0), max_total_weight=3)
    acc.add(_adapter(1.0, 1.0), 3)
    with pytest.raises(ValueError, match="bound"):
        acc.add(_adapter(1.0, 1.0), 1)


def test_a_rejected_update_leaves_the_sum_exactly_as_it_was():
    g = {"a": torch.zeros(70_000), "b": torch.zeros(3)}  # "a" spans several fold chunks
    good = {"a": torch.full((70_000,), 0.25), "b": torch.ones(3)}
    bad = {"a": torch.full((70_000,), 0.5), "b": torch.tensor([1.0, float("inf"), 0.0])}
    clean = WeightedDeltaSum(g, 10)
    clean.add(good, 2)
    dirty = WeightedDeltaSum(g, 10)
    dirty.add(good, 2)
    with pytest.raises(UpdateRejected, match="b: non-finite"):
        dirty.add(bad, 3)  # "a" was already folded in when "b" failed
    assert dirty.count == 1 and dirty.total_weight == 2
    for k in g:
        assert same_bits(dirty.mean()[k], clean.mean()[k])


def test_a_bad_value_late_in_a_large_tensor_leaves_the_sum_exactly_as_it_was():
    g = {"a": torch.zeros(100_000)}
    good = {"a": torch.full((100_000,), 0.25)}
    bad = torch.full((100_000,), 0.5)
    bad[-1] = float("nan")  # in the tensor's last fold chunk: the chunks before it were added
    clean = WeightedDeltaSum(g, 10)
    clean.add(good, 2)
    dirty = WeightedDeltaSum(g, 10)
    dirty.add(good, 2)
    with pytest.raises(UpdateRejected, match="a: non-finite"):
        dirty.add({"a": bad}, 3)
    assert same_bits(dirty.mean()["a"], clean.mean()["a"])


# Before the fold was streamlined and sharded over threads, it computed, for each element,
# round(float64(update - reference) * weight * 2**shift) and added it as int64. `_straight_sums`
# spells that out; the tests below hold the fold to its sums, and to its errors, bit for bit.


def _straight_sums(
    reference: dict[str, torch.Tensor], added: list[tuple[dict[str, torch.Tensor], int]], max_w: int
) -> dict[str, torch.Tensor]:
    shift = 62 - DELTA_LIMIT_EXP - math.ceil(math.log2(max_w))
    sums = {k: torch.zeros(v.shape, dtype=torch.int64) for k, v in reference.items()}
    for update, weight in added:
        scale = float(weight) * 2.0**shift
        for k, ref in reference.items():
            delta = update[k].double() - ref.double()
            sums[k] += torch.round(delta * scale).to(torch.int64)
    return sums


def _awkward(dtype: torch.dtype, count: int, seed: int = 3) -> tuple[dict, list[dict]]:
    """A reference spanning several fold blocks (odd sizes), and updates whose deltas include
    tiny ones, huge ones within the range, ties on the fixed-point grid, -0.0 and subnormals."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * FOLD_BLOCK + 11
    reference = {
        "big": torch.randn(n, generator=gen).to(dtype),
        "odd": (torch.randn(5, 7, generator=gen) * 1e-3).to(dtype),
        "zero": torch.zeros(2, dtype=dtype),
    }
    reference["big"][:8] = 0.0
    reference["big"][-3:] = 0.0
    huge = 4080.0 if dtype == torch.bfloat16 else 4095.5
    tiniest = 5e-324 if dtype == torch.float64 else 1e-45
    updates = []
    for i in range(count):
        update = {
            k: (ref.double() + torch.randn(ref.shape, generator=gen) * 10.0 ** -(i % 5)).to(dtype)
            for k, ref in reference.items()
        }
        head = [huge, -huge, 2.0**-11, 3 * 2.0**-11, -(2.0**-11), 5 * 2.0**-11, 1e-30, -1e-38]
        update["big"][:8] = torch.tensor(head, dtype=torch.float64).to(dtype)
        update["big"][-3:] = torch.tensor([1e-40, -3e-45, tiniest], dtype=torch.float64).to(dtype)
        update["big"][100:110] = reference["big"][100:110]  # zero deltas
        update["zero"] = torch.tensor([-0.0, tiniest], dtype=torch.float64).to(dtype)
        updates.append(update)
    return reference, updates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    ("max_w", "weights"),
    # max_w 1: weight * 2**shift = 2**50, so deltas >= 2 take the fold's slow path;
    # 2**40: weight 1 scales by 2**10 and the deltas k * 2**-11 fall on ties (half to even)
    [(1, [1]), (7, [1, 2, 4]), (1000, [3, 250, 700, 47]), (2**40, [1, 2**39, 12345])],
)
def test_fold_keeps_the_straightforward_arithmetics_bits(dtype, max_w, weights):
    reference, updates = _awkward(dtype, len(weights))
    added = list(zip(updates, weights, strict=True))
    acc = WeightedDeltaSum(reference, max_w)
    for update, weight in added:
        acc.add(update, weight)
    expected = _straight_sums(reference, added, max_w)
    for k in reference:
        assert torch.equal(acc._acc[k], expected[k]), k


def test_sums_do_not_depend_on_the_thread_count_or_the_arrival_order():
    reference, updates = _awkward(torch.float32, 5, seed=4)
    weights = [9, 1, 30, 2, 17]
    expected = _straight_sums(reference, list(zip(updates, weights, strict=True)), 100)
    for threads, order in [(1, [0, 1, 2, 3, 4]), (2, [4, 2, 0, 3, 1]), (3, [1, 3, 4, 0, 2])]:
        acc = WeightedDeltaSum(reference, 100, threads=threads)
        for i in order:
            acc.add(updates[i], weights[i])
        for k in reference:
            assert torch.equal(acc._acc[k], expected[k]), (threads, k)


def _spoiled(reference: dict, key: str, bad: dict[int, float]) -> dict[str, torch.Tensor]:
    update = {k: v + 0.125 for k, v in reference.items()}
    for index, value in bad.items():
        update[key][index] = value
    return update


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    ("key", "bad", "error"),
    # the error is that of the first FOLD_CHUNK elements holding a bad value, key by key
    [
        ("big", {5: 1e6, FOLD_CHUNK + 1: float("nan")}, "big: delta from the global adapter"),
        ("big", {5: float("nan"), FOLD_CHUNK + 1: 1e6}, "big: non-finite values"),
        ("big", {5: 1e6, 6: float("-inf")}, "big: non-finite values"),
        ("big", {-1: 4096.0}, "big: delta from the global adapter reaches 2**12"),
        ("big", {0: -4096.0}, "big: delta from the global adapter reaches 2**12"),
        ("odd", {3: float("inf")}, "odd: non-finite values"),
    ],
)
def test_rejections_name_the_same_key_and_reason_and_leave_the_sum_as_it_was(
    threads, key, bad, error
):
    reference = {"big": torch.zeros(2 * FOLD_CHUNK + 5), "odd": torch.zeros(12)}
    before = _spoiled(reference, "big", {})
    acc = WeightedDeltaSum(reference, 10, threads=threads)
    acc.add(before, 3)
    kept = {k: v.clone() for k, v in acc._acc.items()}
    with pytest.raises(UpdateRejected) as raised:
        acc.add(_spoiled(reference, key, bad), 5)
    assert str(raised.value).startswith(error)
    assert acc.count == 1 and acc.total_weight == 3
    for k in reference:
        assert torch.equal(acc._acc[k], kept[k]), k


def test_deltas_just_inside_the_range_are_folded():
    reference = {"a": torch.zeros(4)}
    update = {"a": torch.tensor([4095.9998, -4095.9998, 4095.0, -0.0])}  # float32 below 4096
    acc = WeightedDeltaSum(reference, 3)
    acc.add(update, 3)
    assert torch.equal(acc._acc["a"], _straight_sums(reference, [(update, 3)], 3)["a"])
