"""The run's random streams: named, in one table, and never two the same."""

import itertools
from pathlib import Path

import pytest

from fedsim import seeds
from fedsim.seeds import ARITY, Stream


def _every_sequence(seed: int, rounds: range, clients: range):
    """(stream, indices) -> generated state, for every stream over a grid of indices."""
    for stream in Stream:
        grids = {0: [()], 1: [(i,) for i in range(max(rounds.stop, clients.stop))]}
        grids[2] = list(itertools.product(rounds, clients))
        for indices in grids[ARITY[stream]]:
            state = seeds.sequence(seed, stream, *indices).generate_state(4)
            yield (stream, indices), tuple(int(x) for x in state)


@pytest.mark.parametrize("seed", [0, 1, 7, 2**31 - 1])
def test_no_two_streams_or_indices_share_a_sequence(seed):
    states: dict[tuple, tuple] = {}
    for key, state in _every_sequence(seed, range(0, 25), range(0, 40)):
        assert state not in states, f"{key} repeats {states.get(state)}"
        states[state] = key
    assert len(states) > 2000


def test_the_collision_the_old_numbering_had_is_gone():
    # Before: client 6's training seed in a round was client 1's dropout draw in that round.
    for round_idx in range(1, 10):
        training = seeds.seed_of(3, Stream.TRAINING, round_idx, 6)
        dropout = seeds.sequence(3, Stream.DROPOUT, round_idx, 1).generate_state(2)
        assert training != int(dropout[0]) << 32 | int(dropout[1])


def test_every_stream_has_a_docstring_and_an_arity():
    assert set(ARITY) == set(Stream)
    source = Path(seeds.__file__).read_text()
    for stream in Stream:
        after = source.split(f"{stream.name} = {int(stream)}\n", 1)[1]
        assert after.lstrip().startswith('"""'), stream.name


def test_a_stream_refuses_the_wrong_number_of_indices():
    with pytest.raises(ValueError, match="TRAINING takes 2 indices"):
        seeds.sequence(0, Stream.TRAINING, 3)


def test_streams_are_a_pure_function_of_their_arguments():
    assert seeds.seed_of(5, Stream.SELECTION, 2) == seeds.seed_of(5, Stream.SELECTION, 2)
    assert seeds.seed_of(5, Stream.SELECTION, 2) != seeds.seed_of(6, Stream.SELECTION, 2)
    a = seeds.generator(5, Stream.PARTITION).random(3)
    b = seeds.generator(5, Stream.PARTITION).random(3)
    assert a.tolist() == b.tolist()
