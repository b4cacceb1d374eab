import pytest
import torch

from fedsim.errors import FedsimInputError
from fedsim.server.strategies import FedAvg, make_strategy


def test_fedavg_moves_the_global_adapter_by_the_mean_delta():
    g = {"a": torch.tensor([1.0, 2.0])}
    new = FedAvg().apply(g, {"a": torch.tensor([0.5, -1.0], dtype=torch.float64)})
    assert new["a"].dtype == torch.float32
    assert new["a"].tolist() == [1.5, 1.0]
    assert g["a"].tolist() == [1.0, 2.0]  # the input is not modified
    assert FedAvg().state_dict() == {}


def test_make_strategy_names_the_available_ones():
    assert isinstance(make_strategy("fedavg"), FedAvg)
    with pytest.raises(FedsimInputError, match=r"server.strategy.*fedavg"):
        make_strategy("nope")
