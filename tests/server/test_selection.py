import pytest

from fedsim.server.selection import (
    available_clients,
    client_seed,
    draw_probabilities,
    round_robin,
    select_clients,
    select_round,
)


def test_selection_is_a_function_of_seed_and_round():
    a = select_clients(seed=0, round_idx=3, num_clients=100, per_round=10)
    assert a == select_clients(seed=0, round_idx=3, num_clients=100, per_round=10)
    assert a == sorted(set(a)) and len(a) == 10 and all(0 <= c < 100 for c in a)
    assert a != select_clients(seed=0, round_idx=4, num_clients=100, per_round=10)
    assert a != select_clients(seed=1, round_idx=3, num_clients=100, per_round=10)


def test_all_clients_when_per_round_equals_num_clients():
    assert select_clients(5, 1, 7, 7) == list(range(7))


def test_client_seeds_differ_by_round_and_client():
    seeds = {client_seed(0, r, c) for r in range(1, 4) for c in range(10)}
    assert len(seeds) == 30


def test_round_robin_walks_the_ids_and_wraps():
    assert [round_robin(r, 5, 2) for r in (1, 2, 3, 4)] == [[0, 1], [2, 3], [0, 4], [1, 2]]
    sel = select_round("round_robin", 0, 2, 5, 2)
    assert sel.clients == [2, 3] and sel.record() == {"kind": "round_robin", "requested": 2}


def test_all_takes_every_client():
    assert select_round("all", 0, 9, 4, 2).clients == [0, 1, 2, 3]


def test_availability_samples_only_available_clients():
    probabilities = [0.0, 1.0, 1.0, 0.0, 1.0, 0.5]
    for r in range(1, 30):
        available = available_clients(3, r, probabilities)
        assert {1, 2, 4} <= set(available) and not {0, 3} & set(available)
        sel = select_round("availability", 3, r, 6, 2, probabilities)
        assert len(sel.clients) == 2 and set(sel.clients) <= set(available)
        assert sel.record() == {"kind": "availability", "requested": 2, "available": len(available)}
        assert sel == select_round("availability", 3, r, 6, 2, probabilities)  # reproducible
    # client 5 (p = 0.5) is available in some rounds and not in others
    seen = [5 in available_clients(3, r, probabilities) for r in range(1, 60)]
    assert 10 < sum(seen) < 50


def test_availability_with_fewer_available_than_requested():
    sel = select_round("availability", 0, 1, 4, 3, [1.0, 0.0, 0.0, 0.0])
    assert sel.clients == [0] and sel.details["available"] == 1
    assert select_round("availability", 0, 1, 2, 2, [0.0, 0.0]).clients == []


@pytest.mark.parametrize(
    ("distribution", "check"),
    [
        ("constant", lambda p: p == [0.7] * 50),
        ("uniform", lambda p: all(0.2 <= x <= 0.6 for x in p) and len(set(p)) == 50),
        ("beta", lambda p: all(0 < x < 1 for x in p) and 0.3 < sum(p) / 50 < 0.7),
    ],
)
def test_availability_distributions(distribution, check):
    p = draw_probabilities(distribution, 50, seed=1, value=0.7, low=0.2, high=0.6, a=2, b=2)
    assert check(p) and p == draw_probabilities(
        distribution, 50, seed=1, value=0.7, low=0.2, high=0.6, a=2, b=2
    )
