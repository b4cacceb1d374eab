from fedsim.server.selection import client_seed, select_clients


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
