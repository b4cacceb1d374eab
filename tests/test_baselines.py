"""The centralized baseline of a federated experiment: one client, every training record, the
federated round's total steps, the same test split."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsim.baselines import centralized
from fedsim.config import clients_per_round, config_from_dict
from fedsim.data.pipeline import prepare_data
from fedsim.errors import FedsimInputError
from tests.conftest import tiny_experiment

ROOT = Path(__file__).resolve().parent.parent


def test_centralized_quickstart_holds_all_training_records_on_one_client() -> None:
    fed = config_from_dict(yaml.safe_load((ROOT / "experiments/quickstart.yaml").read_text()))

    central = centralized(fed)

    assert central.run.name == "quickstart_centralized"
    assert (central.data.num_clients, central.data.partition.kind) == (1, "iid")
    assert clients_per_round(central) == 1
    assert central.client.local_steps == fed.client.local_steps * clients_per_round(fed)
    assert (central.client.lr, central.model.lora, central.run.rounds) == (
        fed.client.lr,
        fed.model.lora,
        fed.run.rounds,
    )
    fed_data = prepare_data(fed.data, fed.run.seed)
    central_data = prepare_data(central.data, central.run.seed)
    assert np.array_equal(fed_data.test, central_data.test)
    assert len(central_data.clients[0]) == sum(len(c) for c in fed_data.clients)


def test_server_side_methods_are_off_in_the_baseline(tmp_path) -> None:
    fed = config_from_dict(
        tiny_experiment(
            tmp_path,
            server={"strategy": "fedadam", "clients_per_round": 3, "robust": {"rule": "median"}},
            client={"local_steps": 4},
        )
    )

    central = centralized(fed, steps_factor=1.5)

    assert (central.server.strategy, central.server.robust.rule) == ("fedavg", "mean")
    assert central.client.local_steps == 18  # 4 steps x 3 clients x 1.5


def test_epoch_budgets_become_the_round_share_of_all_records(tmp_path) -> None:
    fed = config_from_dict(
        tiny_experiment(tmp_path, client={"local_steps": None, "local_epochs": 2.0})
    )

    central = centralized(fed)

    assert central.client.local_epochs == pytest.approx(2.0 * 3 / 6)  # 3 of 6 clients a round


def test_a_fixed_split_file_has_no_centralized_baseline(tmp_path) -> None:
    split = tmp_path / "split.json"
    split.write_text('{"clients": [[0, 1], [2, 3]]}')
    raw = tiny_experiment(
        tmp_path, data={"num_clients": 2, "partition": {"kind": "split_file", "path": str(split)}}
    )
    raw["server"]["clients_per_round"] = 2

    with pytest.raises(FedsimInputError, match="split_file"):
        centralized(config_from_dict(raw))


def test_per_client_slices_have_no_centralized_baseline(tmp_path) -> None:
    # one client cannot hold out the federated clients' own slices: refused, not approximated
    raw = tiny_experiment(tmp_path, data={"test_per_client": 0.2})

    with pytest.raises(FedsimInputError, match=r"data\.test_per_client.*test_per_client=0"):
        centralized(config_from_dict(raw))
    raw["data"]["test_per_client"] = 0
    assert centralized(config_from_dict(raw)).data.num_clients == 1


def test_an_async_run_has_a_synchronous_baseline_with_k_clients_steps_a_round(tmp_path) -> None:
    raw = tiny_experiment(
        tmp_path,
        data={"num_clients": 6},
        client={"local_steps": 3},
        server={"mode": "async", "concurrency": 4, "buffer_size": 2},
        system={"enabled": True},
    )

    central = centralized(config_from_dict(raw))

    assert (central.server.mode, central.server.concurrency) == ("sync", None)
    assert central.client.local_steps == 3 * 2  # one round per server step of K = 2 updates
    assert central.system.enabled is False and central.data.num_clients == 1
