"""Every random stream of a run, named, in one place.

Everything random in a run derives from `run.seed` through one of the streams below. A stream's
numpy `SeedSequence` is `[seed, stream id, *indices]`: the id sits in the same slot for every
stream and each stream has a fixed number of indices, so no two streams (nor two indices of one
stream) can ever share a sequence — a client's training seed can never equal another client's
dropout draw, as happened when each module numbered its own streams.

Changing a stream changes results: `STREAMS_VERSION` is recorded in every round.json, and a run
directory written under another version refuses `--resume` instead of silently diverging.
"""

from __future__ import annotations

import enum

import numpy as np

STREAMS_VERSION = 2
"""Version of this table, in round.json as `random_streams` (runs before it had none: 1)."""


class Stream(enum.IntEnum):
    """The run's random streams; the comment says what indices follow the seed."""

    PARTITION = 1
    """(): the held-out test split and the partition of the records among clients."""
    AVAILABILITY_PROBABILITIES = 2
    """(): each client's availability probability (`server.availability`), drawn once."""
    CLIENT_PROFILE = 3
    """(client): a client's simulated speed and bandwidth (`system`)."""
    SELECTION = 4
    """(round): which clients a round samples."""
    AVAILABILITY = 5
    """(round): which clients are available in a round (`server.selection: availability`)."""
    OVER_SELECTION = 6
    """(round): the order in which extra clients are invited (`server.min_updates`)."""
    DROPOUT = 7
    """(round, client): whether a client drops out of a round (`system.dropout`)."""
    TRAINING = 8
    """(round, client): a client's local training (batch order, LoRA dropout)."""
    DP_NOISE = 9
    """(round): the Gaussian noise added to a round's aggregate (`server.dp`)."""
    LORA_INIT = 10
    """(): the initial global adapter (LoRA A; B starts at zero)."""
    LORA_REINIT = 11
    """(round): FLoRA's fresh LoRA A after round r's factors were merged into the base."""
    ASYNC_SELECTION = 12
    """(): asynchronous training's client choices, one uniform draw per dispatch in dispatch
    order (draw d picks the idle client that dispatch d starts; fedsim.server.async_schedule)."""
    ASYNC_DROPOUT = 13
    """(): whether each asynchronous dispatch drops out, one uniform draw per dispatch in order."""
    ASYNC_TRAINING = 14
    """(dispatch): the local training of one asynchronous dispatch (batch order, LoRA dropout)."""
    CLIENT_TEST = 15
    """(client): which of a client's records are its held-out slice (`data.test_per_client`)."""
    FINETUNE = 16
    """(round, client): a client's local fine-tuning from a round's global adapter (`fedsim eval
    --personalized --finetune-steps`: batch order, LoRA dropout)."""


ARITY = {
    Stream.PARTITION: 0,
    Stream.AVAILABILITY_PROBABILITIES: 0,
    Stream.CLIENT_PROFILE: 1,
    Stream.SELECTION: 1,
    Stream.AVAILABILITY: 1,
    Stream.OVER_SELECTION: 1,
    Stream.DROPOUT: 2,
    Stream.TRAINING: 2,
    Stream.DP_NOISE: 1,
    Stream.LORA_INIT: 0,
    Stream.LORA_REINIT: 1,
    Stream.ASYNC_SELECTION: 0,
    Stream.ASYNC_DROPOUT: 0,
    Stream.ASYNC_TRAINING: 1,
    Stream.CLIENT_TEST: 1,
    Stream.FINETUNE: 2,
}
"""How many indices follow the seed in each stream."""


def sequence(seed: int, stream: Stream, *indices: int) -> np.random.SeedSequence:
    """The `SeedSequence` of one stream at `indices` (see the stream's docstring)."""
    if len(indices) != ARITY[stream]:
        raise ValueError(f"stream {stream.name} takes {ARITY[stream]} indices, got {indices}")
    return np.random.SeedSequence([seed, int(stream), *indices])


def generator(seed: int, stream: Stream, *indices: int) -> np.random.Generator:
    """A numpy generator of one stream."""
    return np.random.default_rng(sequence(seed, stream, *indices))


def seed_of(seed: int, stream: Stream, *indices: int) -> int:
    """A 64-bit integer seed of one stream, for torch (`torch.manual_seed`, a Generator)."""
    high, low = sequence(seed, stream, *indices).generate_state(2)
    return int(high) << 32 | int(low)
