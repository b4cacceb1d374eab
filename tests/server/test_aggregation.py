import itertools

import pytest
import torch

from fedsim.errors import UpdateRejected
from fedsim.server.aggregation import WeightedDeltaSum, check_update, weighted_mean
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
