"""Server strategies: how the round's mean client delta becomes the next global adapter.

A strategy is one small class behind one interface. The aggregator computes the weighted mean
delta (see `aggregation.py`); the strategy turns it into the new global adapter and carries any
state of its own (momentum, moments), which is checkpointed in `server_state.safetensors`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from fedsim.errors import FedsimInputError

TensorDict = dict[str, torch.Tensor]


class Strategy(ABC):
    """Turns the mean client delta of a round into the next global adapter."""

    name: str

    @abstractmethod
    def apply(self, global_adapter: TensorDict, mean_delta: TensorDict) -> TensorDict:
        """Return the new global adapter (same keys, shapes and dtypes as `global_adapter`)."""

    def state_dict(self) -> TensorDict:
        """Tensors to checkpoint with the round; empty for stateless strategies."""
        return {}

    def load_state_dict(self, state: TensorDict) -> None:
        """Restore what `state_dict` returned."""
        if state:
            raise ValueError(f"{self.name} keeps no state, got {sorted(state)[:3]}")


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017) as in FedIT: the global adapter moves by the mean delta."""

    name = "fedavg"

    def apply(self, global_adapter: TensorDict, mean_delta: TensorDict) -> TensorDict:
        return {k: (g.double() + mean_delta[k]).to(g.dtype) for k, g in global_adapter.items()}


STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}


def make_strategy(name: str) -> Strategy:
    """Instantiate the strategy named in `server.strategy`."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        available = ", ".join(sorted(STRATEGIES))
        raise FedsimInputError(
            f"server.strategy: unknown {name!r}; available: {available}"
        ) from None
