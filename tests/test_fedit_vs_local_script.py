"""experiments/fedit_vs_local.py: the runs it trains (centralized baseline, federated, local-only)
are valid configs with the step budgets its table claims."""

import importlib.util
from pathlib import Path

import yaml

from fedsim.config import clients_per_round, config_from_dict

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "fedit_vs_local", ROOT / "experiments/fedit_vs_local.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_centralized_federated_and_local_runs() -> None:
    raw = yaml.safe_load((ROOT / "experiments/fedit_vs_local.yaml").read_text())
    script = _script()
    per_round = clients_per_round(config_from_dict(raw))

    runs = script.variants(raw, [3, 7], (1, per_round), per_round)

    names = [r["run"]["name"] for _, r in runs]
    assert names == [
        "centralized",
        "federated",
        "local_c3",
        f"local_c3_x{per_round}",
        "local_c7",
        f"local_c7_x{per_round}",
    ]
    cfgs = {c.run.name: c for c in (config_from_dict(r) for _, r in runs)}
    central, fed = cfgs["centralized"], cfgs["federated"]
    assert (central.data.num_clients, central.data.partition.kind) == (1, "iid")
    assert clients_per_round(central) == 1
    # the same total optimizer steps as the federated run's clients together, same test split
    total = {n: c.run.rounds * c.client.local_steps * clients_per_round(c) for n, c in cfgs.items()}
    assert (
        total["centralized"]
        == total["federated"]
        == per_round * fed.run.rounds * fed.client.local_steps
    )
    assert (central.data.test_per_category, central.run.seed) == (
        fed.data.test_per_category,
        fed.run.seed,
    )
    assert cfgs["local_c3"].server.client_ids == [3]
    assert total[f"local_c3_x{per_round}"] == total["federated"]
    assert raw["data"]["partition"] == {"kind": "dirichlet", "alpha": 0.1, "min_size": 20}


def test_centralized_run_with_a_larger_budget() -> None:
    raw = yaml.safe_load((ROOT / "experiments/fedit_vs_local.yaml").read_text())
    per_round = clients_per_round(config_from_dict(raw))

    (description, central), _ = _script().variants(raw, [], (1,), per_round, 1.5)

    assert central["run"]["name"] == "centralized_x1.5"
    assert central["client"]["local_steps"] == round(raw["client"]["local_steps"] * per_round * 1.5)
    assert "1.5x the steps" in description
