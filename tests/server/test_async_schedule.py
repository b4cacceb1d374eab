"""The asynchronous schedule on the simulated clock: a pure function of (config, seed), checked
against events written out by hand, for determinism, resume, concurrency, ties and waste."""

import itertools
import tracemalloc

import numpy as np
import pytest

from fedsim.config import SystemConfig
from fedsim.data.profiles import ClientProfile
from fedsim.seeds import Stream, generator
from fedsim.server import async_schedule
from fedsim.server.async_schedule import (
    AsyncSchedule,
    AsyncScheduleConfig,
    ServerStep,
    StalenessRule,
    SystemTiming,
    Timing,
    _Uniforms,
    dispatch_seed,
    staleness_histogram,
    step_metrics,
    step_weights,
    updates_per_simulated_hour,
    wasted_fraction,
)
from fedsim.server.system_model import SystemModel


def system_timing(
    seed: int = 0, speeds: list[float] | None = None, steps: int = 10, **settings
) -> SystemTiming:
    """The system model's timing: `steps` local steps of 1 s at speed 1, and 1 MB adapters, or
    with `speeds` chosen per client, no transfer time."""
    profiles = None if speeds is None else [ClientProfile(speed=s) for s in speeds]
    system = SystemModel(SystemConfig(enabled=True, **settings), seed, profiles)
    return SystemTiming(system, lambda c: steps, 0 if speeds is not None else 1_000_000)


def schedule(seed: int = 0, timing=None, **config) -> AsyncSchedule:
    config = {"num_clients": 50, "concurrency": 8, "buffer_size": 3} | config
    timing = timing or system_timing(seed, speed_sigma=0.7, bandwidth_sigma=0.5)
    return AsyncSchedule(AsyncScheduleConfig(**config), seed, timing)


def events(step: ServerStep) -> list[tuple]:
    """(client, start version, staleness, start time, finish time) of each update, in order."""
    return [
        (u.client, u.start_version, u.staleness, u.dispatch.start_time, u.dispatch.end_time)
        for u in step.updates
    ]


# --- a schedule checked by hand ---------------------------------------------------------------


def three_clients() -> AsyncSchedule:
    # 105 local steps at speeds 35, 21 and 15, no transfer: clients 0, 1, 2 take 3, 5 and 7 s.
    # All three are always in flight (concurrency = clients), so the seeded choice cannot change
    # who runs when: a finished client is the only idle one and starts again at once.
    return schedule(
        num_clients=3,
        concurrency=3,
        buffer_size=2,
        timing=system_timing(speeds=[35, 21, 15], steps=105),
    )


def test_three_clients_follow_the_hand_written_schedule():
    steps = list(three_clients().steps(1, 7))

    # t=0: 0, 1, 2 start from v0.  t=3: 0 buffered, restarts from v0.  t=5: 1 fills the buffer:
    # step 1; 1 restarts from v1.  t=6: 0 (from v0) buffered, restarts from v1.  t=7: 2 (v0):
    # step 2, both applied on v1, stale by 1.  ...  t=15: 1 (started at 10) and 0 (started at
    # 12) finish together: the earlier dispatch goes first; both started from v3 and step 5
    # applies them on v4 (step 4 came at t=14).  t=21: 2 (v4) and 0 (v5) tie again; step 7
    # applies them on v6, stale by 2 and 1.
    assert [(s.version, s.time) for s in steps] == [
        (1, 5.0), (2, 7.0), (3, 10.0), (4, 14.0), (5, 15.0), (6, 20.0), (7, 21.0)
    ]  # fmt: skip
    assert [events(s) for s in steps] == [
        [(0, 0, 0, 0.0, 3.0), (1, 0, 0, 0.0, 5.0)],
        [(0, 0, 1, 3.0, 6.0), (2, 0, 1, 0.0, 7.0)],
        [(0, 1, 1, 6.0, 9.0), (1, 1, 1, 5.0, 10.0)],
        [(0, 2, 1, 9.0, 12.0), (2, 2, 1, 7.0, 14.0)],
        [(1, 3, 1, 10.0, 15.0), (0, 3, 1, 12.0, 15.0)],
        [(0, 5, 0, 15.0, 18.0), (1, 5, 0, 15.0, 20.0)],
        [(2, 4, 2, 14.0, 21.0), (0, 5, 1, 18.0, 21.0)],
    ]
    # Dispatches are numbered as they start: 0-2 at t=0, then 3 (t=3), 4 (5), 5 (6), 6 (7),
    # 7 (9), 8 (10), 9 (12), 10 (14), 11-12 (15), 13 (18), 14 (20).
    assert [[d.index for d in s.started] for s in steps] == [
        [0, 1, 2, 3], [4, 5], [6, 7], [8, 9], [10], [11, 12, 13], [14]
    ]  # fmt: skip
    assert [u.dispatch.index for u in steps[4].updates] == [8, 9]
    # After each step, the oldest version an unfolded update starts from.
    assert [s.oldest_needed for s in steps] == [0, 1, 2, 3, 4, 4, 6]


def test_metrics_of_the_hand_written_schedule():
    step7 = three_clients().step(7)

    assert staleness_histogram(step7) == {1: 1, 2: 1}
    assert updates_per_simulated_hour(step7) == 7 * 2 / 21 * 3600  # 2400
    assert wasted_fraction(step7) == 0.0
    metrics = step_metrics(step7)
    assert metrics["staleness_histogram"] == {"1": 1, "2": 1}
    assert (metrics["staleness_mean"], metrics["staleness_max"]) == (1.5, 2)
    assert metrics["simulated_clock"] == 21.0 and metrics["dispatched"] == 15
    assert step7.to_json()["updates"][0] == {
        "client": 2,
        "dispatch": 10,
        "start_version": 4,
        "staleness": 2,
        "start_time": 14.0,
        "finish_time": 21.0,
    }


# --- ties -------------------------------------------------------------------------------------


def equal_clients(buffer_size: int) -> AsyncSchedule:
    """Four clients of one speed: every dispatch of a wave finishes at the same instant."""
    return schedule(
        num_clients=4, concurrency=4, buffer_size=buffer_size, timing=system_timing(speeds=[1] * 4)
    )


def test_simultaneous_finishes_go_in_dispatch_order_and_refill_after_the_instant():
    first, second = equal_clients(buffer_size=3).steps(1, 2)

    # All four finish at t=10: dispatches 0-2 make step 1, dispatch 3 waits in the buffer; the
    # four new dispatches start only after the instant, so from v1.
    assert [u.dispatch.index for u in first.updates] == [0, 1, 2]
    assert first.time == 10.0 and [u.staleness for u in first.updates] == [0, 0, 0]
    assert [(d.index, d.start_version, d.start_time) for d in second.started] == [
        (4, 1, 10.0), (5, 1, 10.0), (6, 1, 10.0), (7, 1, 10.0)
    ]  # fmt: skip
    # t=20: dispatch 3 (from v0) and 4, 5 (from v1) make step 2.
    assert [(u.dispatch.index, u.staleness) for u in second.updates] == [(3, 1), (4, 0), (5, 0)]


def test_one_instant_can_make_several_steps():
    first, second, third = equal_clients(buffer_size=2).steps(1, 3)

    assert first.time == second.time == 10.0
    # Dispatches 2 and 3 finished with 0 and 1 but are applied on v1: stale by one.
    assert [(u.dispatch.index, u.staleness) for u in second.updates] == [(2, 1), (3, 1)]
    assert second.started == ()  # nothing started from v1: the refill came after step 2
    assert {d.start_version for d in third.started} == {2} and len(third.started) == 4


# --- determinism and resume -------------------------------------------------------------------


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another():
    a = list(schedule(seed=3).steps(1, 40))
    b = list(schedule(seed=3).steps(1, 40))
    other = list(schedule(seed=4).steps(1, 40))

    assert a == b
    assert [events(s) for s in a] != [events(s) for s in other]


def test_resuming_at_step_n_gives_the_suffix_of_the_full_run():
    s = schedule(seed=1)
    full = list(s.steps(1, 60))

    assert list(s.steps(21, 60)) == full[20:]
    assert s.step(37) == full[36]


def test_pending_after_n_is_what_later_steps_fold_from_versions_before_n():
    s = schedule(seed=2, timing=system_timing(2, speed_sigma=0.7, dropout=0.2))
    later = list(s.steps(1, 200))
    for n in (1, 10, 25):
        # Updates folded after step n that started before it are exactly the pending ones.
        expected = sorted(
            (u.dispatch for step in later[n:] for u in step.updates if u.start_version < n),
            key=lambda d: d.index,
        )
        pending = s.pending_after(n)
        assert list(pending) == expected and pending  # something is in flight at every step
        assert s.oldest_needed_version(n) == min(d.start_version for d in pending)
    assert s.pending_after(0) == () and s.oldest_needed_version(0) == 0


def test_the_oldest_needed_version_only_moves_forward():
    oldest = [step.oldest_needed for step in schedule(seed=5).steps(1, 100)]

    assert oldest == sorted(oldest)
    assert all(o < v for v, o in enumerate(oldest, start=1))


def test_dispatch_seeds_differ_per_dispatch_and_come_from_their_own_stream():
    seeds = {dispatch_seed(0, d) for d in range(1000)}

    assert len(seeds) == 1000
    assert dispatch_seed(0, 7) == dispatch_seed(0, 7) != dispatch_seed(1, 7)


def test_draw_d_of_a_stream_is_the_same_whatever_the_block_size():
    draws = _Uniforms(generator(9, Stream.ASYNC_SELECTION))
    many = [draws.draw() for _ in range(_Uniforms.BLOCK + 5)]

    assert many == generator(9, Stream.ASYNC_SELECTION).random(len(many)).tolist()


# --- concurrency ------------------------------------------------------------------------------


def all_dispatches(steps: list[ServerStep]) -> list:
    return [d for step in steps for d in step.started]


def test_exactly_concurrency_clients_are_in_flight_at_every_simulated_moment():
    timing = system_timing(4, speed_sigma=0.9, bandwidth_sigma=0.5, dropout=0.15)
    steps = list(schedule(seed=4, timing=timing, deadline_seconds=25.0).steps(1, 80))
    dispatches = all_dispatches(steps)
    moments = sorted({d.start_time for d in dispatches} | {d.end_time for d in dispatches})

    assert {d.outcome for d in dispatches} == {"update", "dropped_out", "straggler"}
    for t in (m for m in moments if m < steps[-1].time):
        flying = [d for d in dispatches if d.start_time <= t < d.end_time]
        assert len(flying) == 8, t  # never more, and a freed slot is refilled at once
        assert len({d.client for d in flying}) == 8, t  # a client is never in flight twice


def test_buffer_size_one_is_fedasync_one_update_per_step():
    steps = list(schedule(buffer_size=1).steps(1, 30))
    rule = StalenessRule("polynomial", a=0.5)

    assert [len(s.updates) for s in steps] == [1] * 30
    assert [s.time for s in steps] == sorted(s.time for s in steps)
    for s in steps:
        # alpha_t = alpha * s(t - tau): with K = 1 the coefficient is the staleness factor.
        (coefficient,) = step_weights(s, rule, lambda c: 17).coefficients
        assert coefficient == pytest.approx((1 + s.updates[0].staleness) ** -0.5, rel=1e-15)
    assert max(u.staleness for s in steps for u in s.updates) > 0


# --- staleness weights ------------------------------------------------------------------------


def test_staleness_factors_by_hand():
    constant = StalenessRule("constant")
    poly = StalenessRule("polynomial", a=0.5)
    hinge = StalenessRule("hinge", a=10, b=4)

    assert [constant.factor(s) for s in (0, 5, 1000)] == [1.0, 1.0, 1.0]
    assert [poly.factor(s) for s in (0, 3, 8)] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert [hinge.factor(s) for s in (0, 4, 5, 6)] == [1.0, 1.0, 1 / 11, 1 / 21]
    with pytest.raises(ValueError, match="staleness -1"):
        poly.factor(-1)


def test_step_weights_scale_by_staleness_and_divide_by_the_sample_total():
    step = three_clients().step(7)  # client 2 stale by 2, client 0 by 1
    samples = {0: 10, 1: 20, 2: 30}
    weights = step_weights(step, StalenessRule("polynomial", a=1.0), samples.__getitem__)

    assert weights.samples == (30, 10) and weights.factors == (1 / 3, 1 / 2)
    # c_i = n_i s_i / sum n: 30 * 1/3 / 40 and 10 * 1/2 / 40; they sum below 1 (FedBuff's /K).
    assert weights.coefficients == (0.25, 0.125)
    assert weights.fold_weights(scale_bits=4) == ([160, 80], 640)


def test_fold_weights_track_the_coefficients_and_never_pass_the_denominator():
    step = schedule(seed=6, buffer_size=10).step(40)
    weights = step_weights(step, StalenessRule("hinge", a=3, b=1), lambda c: 1 + c % 7)
    folded, denominator = weights.fold_weights()

    assert sum(folded) <= denominator
    for w, c in zip(folded, weights.coefficients, strict=True):
        assert w / denominator == pytest.approx(c, abs=2**-30)


# --- waste ------------------------------------------------------------------------------------


def test_dropouts_are_wasted_counted_and_never_folded():
    timing = system_timing(7, speed_sigma=0.5, dropout=0.25)
    steps = list(schedule(seed=7, timing=timing).steps(1, 150))
    dispatches = all_dispatches(steps)
    dropped = [d for s in steps for d in s.wasted]
    folded = {u.dispatch.index for s in steps for u in s.updates}

    assert dropped and all(d.outcome == "dropped_out" for d in dropped)
    assert not folded & {d.index for d in dropped}
    # Without a deadline a dropout holds its slot as long as the update would have taken.
    for d in dropped:
        assert d.end_time - d.start_time == pytest.approx(timing(d.client).seconds)
    last = steps[-1].totals
    assert last.dropped_out == len(dropped) and last.updates == 150 * 3
    assert wasted_fraction(steps[-1]) == len(dropped) / (len(dropped) + 450)
    assert 0.18 < len(dropped) / len(dispatches) < 0.32


def test_stragglers_and_dropouts_end_at_the_deadline():
    timing = system_timing(8, speed_sigma=1.0, dropout=0.1)
    steps = list(schedule(seed=8, timing=timing, deadline_seconds=15.0).steps(1, 60))
    wasted = [d for s in steps for d in s.wasted]

    assert {d.outcome for d in wasted} == {"dropped_out", "straggler"}
    assert all(d.end_time - d.start_time == pytest.approx(15.0) for d in wasted)
    assert all(timing(d.client).seconds > 15.0 for d in wasted if d.outcome == "straggler")
    assert all(
        u.dispatch.end_time - u.dispatch.start_time <= 15.0 for s in steps for u in s.updates
    )


def test_a_schedule_where_every_dispatch_drops_out_stops(monkeypatch):
    monkeypatch.setattr(async_schedule, "NO_PROGRESS_LIMIT", 50)
    always = schedule(timing=lambda c: Timing(seconds=1.0, dropout=1.0))

    with pytest.raises(RuntimeError, match="50 dispatches in a row ended without an update"):
        next(always.steps())


# --- configuration and scale ------------------------------------------------------------------


def test_a_bad_config_names_every_field_at_once():
    with pytest.raises(ValueError) as err:
        AsyncScheduleConfig(
            num_clients=5,
            concurrency=6,
            buffer_size=0,
            staleness=StalenessRule("linear", a=-1),
            deadline_seconds=0,
        )

    for name in ("concurrency: 6", "buffer_size: 0", "staleness.rule", "staleness.a", "deadline"):
        assert name in str(err.value)


def peak_bytes(num_clients: int) -> int:
    s = schedule(num_clients=num_clients, concurrency=100, buffer_size=1)
    tracemalloc.start()
    for _ in s.steps(1, 200):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_does_not_grow_with_registered_clients():
    # State is per in-flight dispatch: 10,000 registered clients cost what 100 do.
    peak_bytes(100)  # the first run in a process also allocates once-only caches
    assert peak_bytes(10_000) < peak_bytes(100) + 32_000


def test_every_client_can_be_chosen_and_the_choice_is_uniform():
    s = schedule(num_clients=20, concurrency=5, buffer_size=1, timing=lambda c: Timing(1.0, 0.0))
    counts = np.bincount(
        [d.client for step in s.steps(1, 2000) for d in step.started], minlength=20
    )

    assert all(60 < n < 140 for n in counts)  # 2000 dispatches over 20 clients: 100 +- 10 each


def test_steps_start_at_one():
    with pytest.raises(ValueError, match="server steps start at 1"):
        next(schedule().steps(0))
    assert list(itertools.islice(schedule().steps(), 3)) == list(schedule().steps(1, 3))
