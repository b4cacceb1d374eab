"""SCAFFOLD client state files: staged per round, committed with the round, settled at resume."""

import pytest
import torch

from fedsim.errors import FedsimInputError
from fedsim.server.client_state import ClientStateStore


def _state(x: float) -> dict[str, torch.Tensor]:
    return {"c": torch.full((2,), x)}


def test_staged_state_is_invisible_until_committed(tmp_path):
    store = ClientStateStore(tmp_path)
    assert store.load(3) is None and not (tmp_path / "clients").exists()  # untrained: no file
    store.stage(3, 1, _state(1.0))
    assert store.load(3) is None
    assert store.commit(1) == 1
    assert store.load(3)["c"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == ["3.safetensors"]


def test_settle_rolls_forward_the_resume_round_and_drops_later_ones(tmp_path):
    store = ClientStateStore(tmp_path)
    store.stage(1, 1, _state(1.0))
    store.commit(1)
    # crash after round 2's directory was renamed but before its states were committed,
    # with round 3 half done
    store.stage(1, 2, _state(2.0))
    store.stage(4, 2, _state(2.5))
    store.stage(1, 3, _state(3.0))
    store.settle(2)
    assert store.load(1)["c"].tolist() == [2.0, 2.0] and store.load(4)["c"].tolist() == [2.5, 2.5]
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == [
        "1.safetensors",
        "4.safetensors",
    ]


def test_resume_before_a_committed_state_is_refused(tmp_path):
    store = ClientStateStore(tmp_path)
    store.stage(1, 3, _state(3.0))
    store.commit(3)
    store.check_resumable(3)
    with pytest.raises(FedsimInputError, match=r"written by round 3, after the resume point"):
        store.check_resumable(2)
