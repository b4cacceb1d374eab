"""Baselines derived from a federated experiment, so that they differ from it only where they
must: the centralized upper bound (`fedsim run CONFIG --centralized`)."""

from __future__ import annotations

from fedsim.config import ExperimentConfig, clients_per_round, config_from_dict
from fedsim.errors import FedsimInputError


def centralized(cfg: ExperimentConfig, steps_factor: float = 1.0) -> ExperimentConfig:
    """The centralized baseline of `cfg`: the same pipeline, data, test split, model, LoRA and
    local optimiser, with every training record on one client that trains every round for as
    many steps as the federated round's clients together (times `steps_factor`), and plain
    averaging of that one update (FedAvg, server lr 1: the client's own training, continued).

    Whatever only makes sense across clients is off: server optimisers and robust rules, client
    DP, the system model and client profiles. An asynchronous run's baseline is synchronous, with
    K (`server.buffer_size`) clients' steps a round: one round per server step. The run is named
    `<name>_centralized`.
    """
    if cfg.data.partition.kind == "split_file":
        raise FedsimInputError(
            "--centralized: data.partition.kind split_file fixes each client's records; "
            "use a seeded partition (its test split is held out the same way for both runs)"
        )
    if cfg.data.test_per_client:
        raise FedsimInputError(
            "--centralized: data.test_per_client holds out a slice of each federated client, "
            "which one client cannot hold out alike; run the baseline with "
            "--set data.test_per_client=0 (it then also trains on those slices)"
        )
    raw = cfg.to_dict()
    # a round's clients, or an asynchronous step's K updates: the baseline's steps per round
    updates = cfg.server.buffer_size if cfg.server.mode == "async" else clients_per_round(cfg)
    share = updates * steps_factor
    if cfg.client.local_steps is not None:
        raw["client"]["local_steps"] = max(1, round(cfg.client.local_steps * share))
    else:  # epochs over one client's records -> the same passes over the round's share of all
        assert cfg.client.local_epochs is not None
        raw["client"]["local_epochs"] = cfg.client.local_epochs * share / cfg.data.num_clients
    raw["run"]["name"] = f"{cfg.run.name}_centralized"
    raw["data"]["num_clients"] = 1
    raw["data"]["partition"] = {"kind": "iid", "min_size": 1}
    raw["client"]["profile"] = None
    server = raw["server"]
    for key in ("availability", "robust", "dp"):
        server.pop(key)
    server.update(
        mode="sync",
        concurrency=None,
        strategy="fedavg",
        selection="uniform",
        clients_per_round=1,
        fraction=None,
        client_ids=None,
        min_updates=None,
        lr=None,
    )
    raw["system"] = {"enabled": False}
    return config_from_dict(raw)
