"""Server strategies: how the round's mean client delta becomes the next global adapter.

A strategy is one small class behind one interface. The aggregator computes the (weighted, or
robust) mean delta of the round's accepted updates (see `aggregation.py`, `robust.py`); the
strategy turns it into the new global adapter and carries any state of its own (momentum,
moments, control variates), which is checkpointed in `server_state.safetensors` every round, so a
resumed run continues the same optimiser trajectory. The arithmetic of each is a pure function
below its class, unit-tested by hand. State is kept in float64 and saved as such, so a reloaded
state is bitwise the one in memory.

Client-side parts (FedProx's proximal term, SCAFFOLD's drift correction, FFA-LoRA's frozen A,
FedSA-LoRA's own B) reach the trainer through `client_context`, built per client by the
aggregator. The LoRA-native strategies (FFA-LoRA, FedSA-LoRA, FlexLoRA, FLoRA) are at the end;
their arithmetic is in `lora_native.py` (docs/lora-native.md).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from fedsim.errors import FedsimInputError, UpdateRejected
from fedsim.lora_ranks import base_weight_name, pad_adapter
from fedsim.protocol import ClientContext, ClientUpload
from fedsim.seeds import Stream, seed_of
from fedsim.server.aggregation import WeightedDeltaSum, check_delta
from fedsim.server.lora_native import (
    ClientFactors,
    flexlora_factors,
    flora_merged_delta,
    is_lora_a,
    is_lora_b,
    lora_pairs,
    weighted_product,
)

if TYPE_CHECKING:
    from fedsim.config import ServerConfig

TensorDict = dict[str, torch.Tensor]


class Strategy(ABC):
    """Turns the mean client delta of a round into the next global adapter."""

    name: str
    uses_client_state: bool = False
    """True when each client keeps state between its rounds (SCAFFOLD's control variate)."""
    aggregates_products: bool = False
    """True when the strategy needs every client's adapter, not the mean delta (FlexLoRA: the
    mean of the products B_i @ A_i); the aggregator then buffers the round and calls
    `apply_products` instead of `apply`."""

    def client_context(
        self, global_adapter: TensorDict, client_state: TensorDict | None
    ) -> ClientContext:
        """What a client's local training needs from the strategy (none by default)."""
        return ClientContext()

    def begin_round(self, num_selected: int) -> None:  # noqa: B027 (optional hook)
        """Called before a round's updates arrive."""

    def fold_client_state(self, old: TensorDict | None, new: TensorDict) -> None:
        """Fold one accepted client's new state in (`old` is None before its first round)."""
        raise NotImplementedError(f"{self.name} keeps no client state")

    def client_state_of(self, upload: ClientUpload, global_adapter: TensorDict) -> TensorDict:
        """The client state carried by `upload` (already decoded and checked as an update), to
        keep for the client's next round; raises UpdateRejected when malformed. By default the
        upload's own `client_state` (SCAFFOLD's variate), checked like a delta."""
        if not upload.client_state:
            raise UpdateRejected(f"{self.name}: the upload carries no client state")
        check_delta(upload.client_state, global_adapter)
        return upload.client_state

    @abstractmethod
    def apply(self, global_adapter: TensorDict, mean_delta: TensorDict) -> TensorDict:
        """Return the new global adapter (same keys, shapes and dtypes as `global_adapter`)."""

    merges_into_base: bool = False
    """True when the strategy moves the base weights (FLoRA): `base_delta` is then sent to every
    client and saved with the round."""

    def apply_products(
        self,
        global_adapter: TensorDict,
        deltas: list[TensorDict],
        weights: list[int],
        round_idx: int = 0,
    ) -> TensorDict:
        """For `aggregates_products` strategies: the new global adapter from each accepted
        client's delta (float64, at the global shapes) and integer weight, in client-id order."""
        raise NotImplementedError(f"{self.name} aggregates the mean delta")

    def base_delta(self) -> TensorDict | None:
        """For `merges_into_base` strategies: the delta merged into the base weights so far."""
        return None

    def state_dict(self) -> TensorDict:
        """Tensors to checkpoint with the round; empty for stateless strategies."""
        return {}

    def load_state_dict(self, state: TensorDict) -> None:
        """Restore what `state_dict` returned."""
        if state:
            raise ValueError(f"{self.name} keeps no state, got {sorted(state)[:3]}")


def _step(global_adapter: TensorDict, step: TensorDict) -> TensorDict:
    """global + step, computed in float64 and cast back to each tensor's dtype."""
    return {k: (g.double() + step[k]).to(g.dtype) for k, g in global_adapter.items()}


def _prefixed(prefix: str, tensors: TensorDict) -> TensorDict:
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def _unprefixed(prefix: str, state: TensorDict) -> TensorDict:
    head = prefix + "/"
    return {k[len(head) :]: v.double() for k, v in state.items() if k.startswith(head)}


class _StatefulStrategy(Strategy):
    """A strategy whose state is a few named float64 tensor dicts (`slots`)."""

    slots: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.state: dict[str, TensorDict] = {slot: {} for slot in self.slots}

    def state_dict(self) -> TensorDict:
        out: TensorDict = {}
        for slot, tensors in self.state.items():
            out.update(_prefixed(slot, tensors))
        return out

    def load_state_dict(self, state: TensorDict) -> None:
        unknown = [k for k in state if k.split("/", 1)[0] not in self.slots]
        if unknown:
            raise ValueError(f"{self.name}: unexpected server state {sorted(unknown)[:3]}")
        self.state = {slot: _unprefixed(slot, state) for slot in self.slots}


# ---------------------------------------------------------------------------------------------
# FedAvg and FedProx
# ---------------------------------------------------------------------------------------------


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017) as in FedIT: the global adapter moves by lr * mean delta."""

    name = "fedavg"

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def apply(self, global_adapter: TensorDict, mean_delta: TensorDict) -> TensorDict:
        if self.lr == 1.0:  # keeps plain FedAvg bitwise the average
            return _step(global_adapter, mean_delta)
        return _step(global_adapter, {k: self.lr * d for k, d in mean_delta.items()})


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg on the server; each client adds (mu/2)*||w - w_global||^2
    over its trainable parameters to its local objective."""

    name = "fedprox"

    def __init__(self, lr: float = 1.0, mu: float = 0.01) -> None:
        super().__init__(lr)
        self.mu = mu

    def client_context(
        self, global_adapter: TensorDict, client_state: TensorDict | None
    ) -> ClientContext:
        return ClientContext(prox_mu=self.mu)


# ---------------------------------------------------------------------------------------------
# FedAvgM
# ---------------------------------------------------------------------------------------------


def fedavgm_step(
    momentum: TensorDict, mean_delta: TensorDict, lr: float, beta: float
) -> tuple[TensorDict, TensorDict]:
    """Server momentum (Hsu et al. 2019): m <- beta*m + delta; step = lr*m. Returns (m, step)."""
    new_m = {
        k: beta * momentum[k] + d if k in momentum else d.clone() for k, d in mean_delta.items()
    }
    return new_m, {k: lr * m for k, m in new_m.items()}


class FedAvgM(_StatefulStrategy):
    """FedAvg with server momentum on the averaged update."""

    name = "fedavgm"
    slots = ("momentum",)

    def __init__(self, lr: float = 1.0, beta: float = 0.9) -> None:
        super().__init__()
        self.lr, self.beta = lr, beta

    def apply(self, global_adapter: TensorDict, mean_delta: TensorDict) -> TensorDict:
        self.state["momentum"], step = fedavgm_step(
            self.state["momentum"], mean_delta, self.lr, self.beta
        )
        return _step(global_adapter, step)


# ---------------------------------------------------------------------------------------------
# Adaptive server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2)
# ---------------------------------------------------------------------------------------------


def adaptive_step(
    kind: str,
    m: TensorDict,
    v: TensorDict,
    mean_delta: TensorDict,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[TensorDict, TensorDict, TensorDict]:
    """One FedAdagrad / FedYogi / FedAdam step on the pseudo-gradient `mean_delta`.

    m <- beta1*m + (1-beta1)*delta;
    v <- v + delta^2 (adagrad) | v - (1-beta2)*delta^2*sign(v - delta^2) (yogi)
         | beta2*v + (1-beta2)*delta^2 (adam);
    step = lr * m / (sqrt(v) + tau). Moments start at zero, without bias correction, as in the
    paper. Returns (m, v, step).
    """
    new_m, new_v, step = {}, {}, {}
    for k, d in mean_delta.items():
        m_k = m.get(k, torch.zeros_like(d))
        v_k = v.get(k, torch.zeros_like(d))
        d2 = d * d
        new_m[k] = beta1 * m_k + (1 - beta1) * d
        if kind == "fedadagrad":
            new_v[k] = v_k + d2
        elif kind == "fedyogi":
            new_v[k] = v_k - (1 - beta2) * d2 * torch.sign(v_k - d2)
        elif kind == "fedadam":
            new_v[k] = beta2 * v_k + (1 - beta2) * d2
        else:
            raise ValueError(f"unknown adaptive optimiser {kind!r}")
        step[k] = lr * new_m[k] / (new_v[k].sqrt() + tau)
    return new_m, new_v, step


class _Adaptive(_StatefulStrategy):
    slots = ("m", "v")

    def __init__(
        self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__()
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau

    def apply(self, global_adapter: TensorDict, mean_delta: TensorDict) -> TensorDict:
        m, v, step = adaptive_step(
            self.name,
            self.state["m"],
            self.state["v"],
            mean_delta,
            self.lr,
            self.beta1,
            self.beta2,
            self.tau,
        )
        self.state = {"m": m, "v": v}
        return _step(global_adapter, step)


class FedAdagrad(_Adaptive):
    """Adagrad on the server: v accumulates the squared averaged update."""

    name = "fedadagrad"


class FedYogi(_Adaptive):
    """Yogi on the server: v moves additively toward the squared averaged update."""

    name = "fedyogi"


class FedAdam(_Adaptive):
    """Adam on the server (no bias correction, as in Reddi et al.)."""

    name = "fedadam"


# ---------------------------------------------------------------------------------------------
# SCAFFOLD (Karimireddy et al. 2020, option II)
# ---------------------------------------------------------------------------------------------


def scaffold_server_variate(
    c: TensorDict, mean_delta_c: TensorDict, num_contributing: int, num_clients: int
) -> TensorDict:
    """c <- c + (|S| / N) * mean_i(c_i+ - c_i) over the round's contributing clients S."""
    share = num_contributing / num_clients
    return {k: c[k] + share * d if k in c else share * d for k, d in mean_delta_c.items()}


class Scaffold(Strategy):
    """SCAFFOLD: the server variate c is strategy state; each client's c_i is kept under
    `clients/<id>.safetensors` by the aggregator, only for clients that have trained."""

    name = "scaffold"
    uses_client_state = True

    def __init__(self, lr: float = 1.0, num_clients: int = 1) -> None:
        self.lr, self.num_clients = lr, num_clients
        self.c: TensorDict = {}
        self._dc: WeightedDeltaSum | None = None
        self._capacity = 1

    def client_context(
        self, global_adapter: TensorDict, client_state: TensorDict | None
    ) -> ClientContext:
        correction = {}
        for k, g in global_adapter.items():
            c = self.c[k] if k in self.c else torch.zeros(g.shape, dtype=torch.float64)
            c_i = client_state[k].double() if client_state else 0.0
            correction[k] = (c - c_i).float()
        return ClientContext(correction=correction)

    def begin_round(self, num_selected: int) -> None:
        self._dc = None
        self._capacity = max(1, num_selected)

    def fold_client_state(self, old: TensorDict | None, new: TensorDict) -> None:
        if self._dc is None:  # the variates' mean: uniform, exact and order-independent
            zeros = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in new.items()}
            self._dc = WeightedDeltaSum(zeros, self._capacity)
        # new - old, with old = 0 before the client's first round
        shifted = new if old is None else {k: (new[k].double() - old[k].double()) for k in new}
        self._dc.add_delta({k: v.double() for k, v in shifted.items()}, 1)

    def apply(self, global_adapter: TensorDict, mean_delta: TensorDict) -> TensorDict:
        if self._dc is not None and self._dc.count:
            self.c = scaffold_server_variate(
                self.c, self._dc.mean(), self._dc.count, self.num_clients
            )
        self._dc = None
        if self.lr == 1.0:
            return _step(global_adapter, mean_delta)
        return _step(global_adapter, {k: self.lr * d for k, d in mean_delta.items()})

    def state_dict(self) -> TensorDict:
        return _prefixed("c", self.c)

    def load_state_dict(self, state: TensorDict) -> None:
        unknown = [k for k in state if not k.startswith("c/")]
        if unknown:
            raise ValueError(f"scaffold: unexpected server state {sorted(unknown)[:3]}")
        self.c = _unprefixed("c", state)


# ---------------------------------------------------------------------------------------------
# FFA-LoRA (Sun et al. 2024) and FedSA-LoRA (Guo et al. 2025): see fedsim/server/lora_native.py
# ---------------------------------------------------------------------------------------------


class FFALoRA(FedAvg):
    """FFA-LoRA: every client keeps A at the shared seeded initialisation and trains only B, so
    the average of B is the average of the updates B_i @ A. The server moves B by lr * mean delta
    and never A: A stays bitwise its initial value, even when DP noise lands on its coordinates
    (that noise is discarded, which is post-processing of the private mean)."""

    name = "ffa_lora"

    def client_context(
        self, global_adapter: TensorDict, client_state: TensorDict | None
    ) -> ClientContext:
        return ClientContext(freeze_lora_a=True)

    def apply(self, global_adapter: TensorDict, mean_delta: TensorDict) -> TensorDict:
        stepped = super().apply(global_adapter, mean_delta)
        return {k: global_adapter[k] if is_lora_a(k) else v for k, v in stepped.items()}


class FedSALoRA(FedAvg):
    """FedSA-LoRA: A is shared and averaged; each client keeps its own B between its rounds
    (`clients/<id>.safetensors`) and starts local training from it. The global adapter (what
    `fedsim eval` scores, and what a client without a B of its own starts from) is the averaged
    A with the round's averaged B: with the default lr 1, the weighted mean of the B's the round's
    clients trained."""

    name = "fedsa_lora"
    uses_client_state = True

    def client_context(
        self, global_adapter: TensorDict, client_state: TensorDict | None
    ) -> ClientContext:
        if not client_state:
            return ClientContext()
        # a lower-rank client kept only its own components: pad back to the global shapes
        reference = {k: global_adapter[k] for k in client_state}
        return ClientContext(start=pad_adapter(client_state, reference))

    def fold_client_state(self, old: TensorDict | None, new: TensorDict) -> None:
        return None  # each B stays with its client; the server aggregates none of them

    def client_state_of(self, upload: ClientUpload, global_adapter: TensorDict) -> TensorDict:
        # The trained B itself, bit for bit (uplink compression is refused for this strategy by
        # the config check, so `tensors` is the adapter as trained, already checked).
        if upload.encoding != "raw":
            raise UpdateRejected(f"{self.name}: needs the adapter itself, got {upload.encoding}")
        return {k: v for k, v in upload.tensors.items() if is_lora_b(k)}


class _AggregatesProducts:
    """For strategies that need every client's adapter, not the round's mean delta: the
    aggregator buffers the round and calls `apply_products`; `apply` is never theirs."""

    name: str
    aggregates_products = True

    def apply(self, global_adapter: TensorDict, mean_delta: TensorDict) -> TensorDict:
        raise NotImplementedError(f"{self.name} aggregates the clients' products (apply_products)")


class FlexLoRA(_AggregatesProducts, Strategy):
    """FlexLoRA: the round's global update is sum_i p_i B_i @ A_i per target matrix (the mean of
    what the clients' adapters stand for, not of their factors), and the next global adapter is
    its rank-r truncated SVD (`flexlora_factors`). A rank-r_i client (`lora_rank` in the profile)
    trains the first r_i components of it, which are exactly the rank-r_i truncated SVD: truncated
    SVD factors are nested. Stateless: the adapter in the round checkpoint is the whole state.
    (The LoRA scaling alpha/r is the same for every client, as rank masks train at the global
    scaling, so it cancels out of the SVD.)"""

    name = "flexlora"

    def apply_products(
        self,
        global_adapter: TensorDict,
        deltas: list[TensorDict],
        weights: list[int],
        round_idx: int = 0,
    ) -> TensorDict:
        local, shares = _local_adapters(global_adapter, deltas, weights)
        new: TensorDict = {}
        for a_key, b_key, clients in _client_factors(global_adapter, local, shares):
            rank = global_adapter[a_key].shape[0]
            a, b = flexlora_factors(weighted_product(clients), rank)
            new[a_key] = a.to(global_adapter[a_key].dtype)
            new[b_key] = b.to(global_adapter[b_key].dtype)
        for key, g in global_adapter.items():  # anything that is not a LoRA pair: its mean
            if key not in new:
                mean = sum(p * x[key] for x, p in zip(local, shares, strict=True))
                new[key] = mean.to(g.dtype)  # type: ignore[union-attr]
        return {k: new[k] for k in global_adapter}


def _local_adapters(
    global_adapter: TensorDict, deltas: list[TensorDict], weights: list[int]
) -> tuple[list[TensorDict], list[float]]:
    """The clients' own adapters (global + delta, float64) and their shares of the round."""
    total = sum(weights)
    local = [{k: g.double() + d[k] for k, g in global_adapter.items()} for d in deltas]
    return local, [w / total for w in weights]


def _client_factors(
    global_adapter: TensorDict,
    local: list[TensorDict],
    shares: list[float],
    scaling: float = 1.0,
) -> Iterator[tuple[str, str, list[ClientFactors]]]:
    """(lora_A key, lora_B key, every client's factors of that matrix) per target matrix."""
    for a_key, b_key in lora_pairs(global_adapter).values():
        clients = [
            ClientFactors(x[a_key], x[b_key], p, scaling)
            for x, p in zip(local, shares, strict=True)
        ]
        yield a_key, b_key, clients


def fresh_lora(global_adapter: TensorDict, seed: int, round_idx: int) -> TensorDict:
    """FLoRA's fresh factors after round `round_idx`: every A drawn as PEFT initialises it
    (kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) from the stream
    (seed, LORA_REINIT, round), every B zero, so the adapter adds nothing until trained."""
    gen = torch.Generator().manual_seed(seed_of(seed, Stream.LORA_REINIT, round_idx))
    out = {}
    for key in sorted(global_adapter):
        g = global_adapter[key]
        if is_lora_a(key):
            bound = 1.0 / math.sqrt(g.shape[1])
            draw = torch.rand(g.shape, generator=gen, dtype=torch.float64)
            out[key] = ((2.0 * draw - 1.0) * bound).to(g.dtype)
        else:
            out[key] = torch.zeros_like(g)
    return {k: out[k] for k in global_adapter}


class FLoRA(_AggregatesProducts, _StatefulStrategy):
    """FLoRA: each round, the clients' factors are stacked along the rank (A's rows scaled by
    p_i * alpha/r), which stands for sum_i p_i (alpha/r) B_i @ A_i exactly whatever each client's
    rank; that product is merged into the base weights (`base_delta`, float64 strategy state,
    saved in every round's server_state.safetensors), and the next round starts from fresh LoRA
    factors (`fresh_lora`). Lower-rank clients (rank masks) contribute their own components."""

    name = "flora"
    merges_into_base = True
    slots = ("base_delta",)

    def __init__(self, seed: int = 0, lora_scaling: float = 1.0) -> None:
        super().__init__()
        self.seed, self.lora_scaling = seed, lora_scaling

    def apply_products(
        self,
        global_adapter: TensorDict,
        deltas: list[TensorDict],
        weights: list[int],
        round_idx: int = 0,
    ) -> TensorDict:
        local, shares = _local_adapters(global_adapter, deltas, weights)
        merged = self.state["base_delta"]
        factors = _client_factors(global_adapter, local, shares, self.lora_scaling)
        for a_key, _, clients in factors:
            name = base_weight_name(a_key)
            step = flora_merged_delta(clients)
            merged[name] = merged[name] + step if name in merged else step
        return fresh_lora(global_adapter, self.seed, round_idx)

    def base_delta(self) -> TensorDict | None:
        return self.state["base_delta"] or None


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s
    for s in (
        FedAvg,
        FedProx,
        FedAvgM,
        FedAdagrad,
        FedYogi,
        FedAdam,
        Scaffold,
        FFALoRA,
        FedSALoRA,
        FlexLoRA,
        FLoRA,
    )
}
ADAPTIVE = ("fedadagrad", "fedyogi", "fedadam")


def default_server_lr(name: str) -> float:
    """Server learning rate when `server.lr` is null."""
    return 0.01 if name in ADAPTIVE else 1.0


def make_strategy(
    name: str,
    server: ServerConfig | None = None,
    num_clients: int = 1,
    seed: int = 0,
    lora_scaling: float = 1.0,
) -> Strategy:
    """Instantiate the strategy named in `server.strategy` with its parameters from `server`
    (FLoRA also needs the run's seed and the LoRA scaling alpha/r)."""
    if name not in STRATEGIES:
        available = ", ".join(sorted(STRATEGIES))
        raise FedsimInputError(f"server.strategy: unknown {name!r}; available: {available}")
    if server is None:
        from fedsim.config import ServerConfig

        server = ServerConfig(strategy=name)
    lr = server.lr if server.lr is not None else default_server_lr(name)
    if name in ("fedavg", "ffa_lora", "fedsa_lora"):
        return STRATEGIES[name](lr)  # type: ignore[call-arg]
    if name == "flexlora":
        return FlexLoRA()
    if name == "flora":
        return FLoRA(seed, lora_scaling)
    if name == "fedprox":
        return FedProx(lr, server.prox_mu)
    if name == "fedavgm":
        return FedAvgM(lr, server.momentum)
    if name == "scaffold":
        return Scaffold(lr, num_clients)
    return STRATEGIES[name](lr, server.beta1, server.beta2, server.tau)  # type: ignore[call-arg]
