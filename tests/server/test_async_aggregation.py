"""Asynchronous server steps in the aggregator, checked by hand on the three-client schedule of
docs/async.md: each update is a delta from its own start version, weighted by n_i s(tau_i), and
the sum is divided by the sample total of the step's accepted updates."""

import pytest
import torch

from fedsim.config import ExperimentConfig, RobustConfig, ServerConfig, StalenessConfig
from fedsim.protocol import encode_upload
from fedsim.server.aggregator import Aggregator
from fedsim.server.async_schedule import (
    FOLD_SCALE_BITS,
    AsyncSchedule,
    AsyncScheduleConfig,
    ServerStep,
    StalenessRule,
    Timing,
    step_weights,
)

SAMPLES = {0: 1, 1: 2, 2: 3}
"""n_i of clients 0, 1 and 2."""
RULE = StalenessRule("polynomial", a=1.0)
"""(1 + s)^-1: staleness 1 halves an update, exactly."""


def three_clients(buffer_size: int = 2) -> AsyncSchedule:
    """Clients 0, 1, 2 take 3, 5 and 7 s, all three always in flight (docs/async.md's table)."""
    seconds = {0: 3.0, 1: 5.0, 2: 7.0}
    config = AsyncScheduleConfig(num_clients=3, concurrency=3, buffer_size=buffer_size)
    return AsyncSchedule(config, 0, lambda c: Timing(seconds[c], 0.0))


def aggregator(tmp_path, lr: float | None = None) -> Aggregator:
    server = ServerConfig(
        mode="async", concurrency=3, buffer_size=2, lr=lr, staleness=StalenessConfig("polynomial")
    )
    agg = Aggregator(str(tmp_path), ExperimentConfig(server=server), {"r": 1}, {})
    agg.set_global({"w": torch.zeros(1, dtype=torch.float64)})
    return agg


def apply(agg: Aggregator, step: ServerStep, versions: dict[int, dict], delta=None) -> float:
    """Run `step` as fedsim.async_rounds does, dispatch d having trained its start version plus
    `delta(d)` (d + 1 by default); returns the new global value."""
    weights = step_weights(step, RULE, SAMPLES.__getitem__)
    fold, _ = weights.fold_weights()
    keys = [u.dispatch.index for u in step.updates]
    units = {k: n << FOLD_SCALE_BITS for k, n in zip(keys, weights.samples, strict=True)}
    agg.begin_step(step.version, dict(zip(keys, fold, strict=True)), units)
    for u in step.updates:
        start = versions[u.start_version]
        d = u.dispatch.index
        trained = {"w": start["w"] + (delta(d) if delta else d + 1)}
        agg.fold(d, trained, start)
    _, adapter = agg.finish_round(step.version, {})
    versions[step.version] = adapter
    return float(adapter["w"])


def test_three_client_steps_by_hand(tmp_path):
    agg = aggregator(tmp_path)
    versions = {0: {"w": torch.zeros(1, dtype=torch.float64)}}
    one, two, three = three_clients().steps(1, 3)
    shown = [
        [(u.dispatch.index, u.client, u.start_version, u.staleness) for u in s.updates]
        for s in (one, two, three)
    ]  # (dispatch, client, start version, staleness); the seed drew dispatch 2 for client 0
    assert shown == [
        [(2, 0, 0, 0), (0, 1, 0, 0)],
        [(3, 0, 0, 1), (1, 2, 0, 1)],
        [(5, 0, 1, 1), (4, 1, 1, 1)],
    ]

    # step 1 (t=5): dispatch 2 (client 0, n=1, delta 3) and 0 (client 1, n=2, delta 1), both
    # fresh: g1 = (1*3 + 2*1) / (1 + 2)
    g1 = apply(agg, one, versions)
    assert g1 == pytest.approx(5 / 3, abs=1e-12)

    # step 2 (t=7): dispatch 3 (client 0 again, n=1, delta 4) and 1 (client 2, n=3, delta 2),
    # both from v0, stale by one step (factor 1/2); each delta is taken against v0, not v1:
    # g2 = g1 + (1 * 1/2 * 4 + 3 * 1/2 * 2) / (1 + 3)
    g2 = apply(agg, two, versions)
    assert g2 == pytest.approx(5 / 3 + 5 / 4, abs=1e-12)

    # step 3 (t=10): dispatch 5 (client 0, n=1, delta 6) and 4 (client 1, n=2, delta 5), from
    # v1, stale by one: g3 = g2 + (1 * 1/2 * 6 + 2 * 1/2 * 5) / (1 + 2)
    assert apply(agg, three, versions) == pytest.approx(g2 + 8 / 3, abs=1e-12)


def test_buffer_size_one_with_a_server_lr_is_fedasync_mixing(tmp_path):
    """K = 1, lr alpha: g_v = g_(v-1) + alpha * s(tau) * (x - g_start); n_i cancels."""
    agg = aggregator(tmp_path, lr=0.5)
    versions = {0: {"w": torch.zeros(1, dtype=torch.float64)}}
    g = 0.0
    for step in three_clients(buffer_size=1).steps(1, 5):
        (u,) = step.updates
        expected = g + 0.5 * (1 + u.staleness) ** -1 * 10.0
        g = apply(agg, step, versions, delta=lambda d: 10.0)
        assert g == pytest.approx(expected, abs=1e-12)
    assert any(step.updates[0].staleness > 0 for step in three_clients(1).steps(1, 5))


def test_a_rejected_update_leaves_the_others_own_coefficients(tmp_path):
    """A bad update is dropped and the step divides by the accepted updates' samples."""
    agg = aggregator(tmp_path)
    versions = {0: {"w": torch.zeros(1, dtype=torch.float64)}}
    one = three_clients().step(1)
    # dispatch 0 (client 1) uploads NaN: dispatch 2 (client 0, n=1, fresh) makes the step alone
    g1 = apply(agg, one, versions, delta=lambda d: float("nan") if d == 0 else 3.0)
    assert g1 == pytest.approx(3.0, abs=1e-12)


def one_update_step(agg: Aggregator, upload, trained_from: dict) -> dict:
    """A step of one fresh update of weight 1 (c = 1): the new adapter is current + delta."""
    step = three_clients(buffer_size=1).step(1)
    d = step.updates[0].dispatch.index
    agg.begin_step(1, {d: 1 << FOLD_SCALE_BITS}, {d: 1 << FOLD_SCALE_BITS})
    assert agg.fold(d, upload, trained_from) is None
    return agg.finish_round(1, {})[1]


def test_a_compressed_lower_rank_upload_is_decoded_against_its_own_start(tmp_path):
    """HetLoRA's rank-1 client with an fp16 delta: the trained first component moves by the
    delta, the zero-padded second one goes to 0 - start (not 0 - current)."""
    start = {"m.lora_A.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
             "m.lora_B.weight": torch.tensor([[0.5, 0.25]])}  # fmt: skip
    current = {k: v + 1 for k, v in start.items()}
    local = {"m.lora_A.weight": torch.tensor([[1.5, 2.5], [3.0, 4.0]]),
             "m.lora_B.weight": torch.tensor([[0.75, 0.25]])}  # fmt: skip
    agg = aggregator(tmp_path)
    agg.set_global(current)
    new = one_update_step(agg, encode_upload(local, start, "fp16", rank=1), start)
    # A: current + ([[0.5, 0.5], [0, 0] - [3, 4]]); B: current + [[0.25, 0 - 0.25]]
    assert torch.equal(new["m.lora_A.weight"], torch.tensor([[2.5, 3.5], [1.0, 1.0]]))
    assert torch.equal(new["m.lora_B.weight"], torch.tensor([[1.75, 1.0]]))


def test_clipping_applies_to_the_delta_from_the_start_version(tmp_path):
    server = ServerConfig(mode="async", concurrency=3, robust=RobustConfig(clip_norm=2.5))
    agg = Aggregator(str(tmp_path), ExperimentConfig(server=server), {"r": 1}, {})
    start = {"w": torch.zeros(1, dtype=torch.float64)}
    agg.set_global({"w": torch.ones(1, dtype=torch.float64)})
    new = one_update_step(agg, {"w": start["w"] + 3.0}, start)
    assert float(new["w"]) == 1.0 + 2.5  # delta 3 from the start, clipped to 2.5
