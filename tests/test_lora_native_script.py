"""experiments/lora_native.py: the runs it trains are valid configs of the issue's setting, its
table is mean ± spread over seeds, and (slow) the whole pipeline runs in --quick mode."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from fedsim.config import config_from_dict
from fedsim.data.pipeline import prepare_data
from fedsim.data.profiles import load_profiles

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "lora_native", ROOT / "experiments/lora_native.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_method_is_a_valid_run_of_the_issues_setting(tmp_path: Path) -> None:
    script = _script()
    base = script.base_config(tmp_path, 30, quick=False)
    profile = tmp_path / "profile.yaml"
    profile.write_text(script.profile_text(script.RANKS, 20))

    cfgs = {
        key: config_from_dict(script.run_config(base, key, 1, profile, []))
        for key in script.METHODS
    }

    some = cfgs["fedavg"]
    assert (some.data.num_clients, some.run.rounds, some.run.seed) == (20, 30, 1)
    assert (some.data.partition.kind, some.data.partition.alpha) == ("dirichlet", 0.1)
    assert (some.model.lora.r, some.data.test_per_client) == (16, 0.2)
    assert some.data.source == "builtin:quickstart"
    assert {k: c.server.strategy for k, c in cfgs.items()} == {
        "fedavg": "fedavg",
        "hetlora": "fedavg",
        "flora": "flora",
        "flexlora": "flexlora",
        "ffa_lora": "ffa_lora",
        "fedsa_lora": "fedsa_lora",
        "fedavg_ft": "fedavg",
    }
    heterogeneous = {k for k, c in cfgs.items() if c.client.profile}
    assert heterogeneous == {"hetlora", "flora", "flexlora", "ffa_lora", "fedsa_lora"}
    ranks = [p.lora_rank for p in load_profiles(profile, 20, 16)]
    assert ranks[:6] == [4, 8, 16, 4, 8, 16] and sorted(set(ranks)) == [4, 8, 16]
    # the split holds at alpha 0.1 with a fifth of every client held out
    data = prepare_data(some.data, some.run.seed)
    assert len(data.client_test) == 20 and all(len(t) >= 4 for t in data.client_test)
    # FedAvg + local fine-tune fine-tunes FedAvg's run rather than training its own
    assert script.METHODS["fedavg_ft"].run_key("fedavg_ft") == "fedavg"


def test_table_is_mean_and_sample_spread_over_seeds() -> None:
    script = _script()
    row = {"global_exact": 0.5, "pers_mean_loss": 1.0, "pers_worst_loss": 2.0}
    row |= {"global_loss": 1.0, "uplink_mb": 0.1, "downlink_mb": 0.2, "seconds": 3.0}
    results = {
        "fedavg": [row, {**row, "global_loss": 3.0, "global_exact": 0.7}],
        "fedsa_lora": [{**row, "global_loss": 1.5, "pers_mean_loss": 0.5}],
    }

    table = script.results_table(results)
    best = script.best_lines(results)

    # mean 2.0 and sample standard deviation sqrt(2) of 1.0 and 3.0; one seed: no spread
    assert table[2].startswith("| FedAvg | 2.000 ± 1.414 | 0.600 ± 0.141 |")
    assert table[3].startswith("| FedSA-LoRA | 1.500 | 0.500 |")
    assert best[0] == "- global held-out loss: best FedSA-LoRA (1.500), then FedAvg (2.000, +0.500)"
    assert "personalized mean loss: best FedSA-LoRA (0.500)" in best[2]


def test_unknown_methods_are_refused() -> None:
    with pytest.raises(SystemExit):
        _script().parse_args(["--methods", "fedavg,fedsgd"])


@pytest.mark.slow
def test_quick_mode_runs_the_whole_pipeline(ray_local, tmp_path: Path) -> None:
    script = _script()
    out = tmp_path / "ln"

    results = script.main(["--quick", "--out", str(out), "--methods", "fedsa_lora,fedavg_ft"])

    lines = results.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| FedSA") or line.startswith("| FedAvg")]
    assert [r.split(" | ")[0] for r in rows] == ["| FedSA-LoRA", "| FedAvg + local fine-tune"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "fedavg_s0",
        "fedsa_lora_s0",
        "report",
    ]
    assert (out / "report" / "personalized.png").is_file()
    personalized = yaml.safe_load(
        (out / "fedavg_s0/rounds/round_0002/eval/personalized.json").read_text()
    )
    assert set(personalized["models"]) == {"global", "finetune_2"}
    # an existing run directory is kept: without --reuse the script refuses to go on
    with pytest.raises(SystemExit, match="exists"):
        script.main(["--quick", "--out", str(out), "--methods", "fedavg"])
