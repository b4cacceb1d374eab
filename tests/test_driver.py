"""End-to-end runs on a real local Ray instance with the tiny model."""

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedsim import checkpoint
from fedsim.config import config_from_dict
from fedsim.driver import run_experiment
from fedsim.tb import tensorboard_available
from tests.conftest import tiny_experiment
from tests.peft_checks import (
    assert_differs_from_a_fresh_adapter,
    assert_model_holds_the_file,
    same_bits,
)

pytestmark = pytest.mark.ray

ROUND_FILES = {"adapter_model.safetensors", "adapter_config.json", "round.json"}


def _adapter(run_dir: Path, round_idx: int) -> dict[str, torch.Tensor]:
    return load_file(
        run_dir / "rounds" / checkpoint.round_name(round_idx) / "adapter_model.safetensors"
    )


def _assert_same_adapter(a: dict, b: dict) -> None:
    """Bitwise: torch.equal would let -0.0 stand for +0.0."""
    assert a and a.keys() == b.keys()
    for key in a:
        assert same_bits(a[key], b[key]), key


def _experiment(tmp_path: Path, **sections: dict) -> dict:
    """`tiny_experiment` with a small held-out test split, which the held-out probe reads."""
    data = {"test_per_category": 2, **sections.pop("data", {})}
    return tiny_experiment(tmp_path, data=data, **sections)


@pytest.fixture(scope="module")
def reference_run(ray_local, tmp_path_factory):
    """Three uninterrupted rounds with two workers; other tests compare against it."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = config_from_dict(_experiment(tmp, run={"rounds": 3}))
    result = run_experiment(cfg, log=lambda _: None, show_progress=False)
    return cfg, result


def test_run_directory_layout(reference_run):
    cfg, result = reference_run
    run_dir = result.run_dir
    assert (result.first_round, result.last_round) == (1, 3)
    optional = {"tensorboard"} if tensorboard_available() else set()  # the tensorboard extra
    assert {p.name for p in run_dir.iterdir()} == {
        "config.yaml",
        "partition.json",
        "shards",
        "rounds",
        "latest",
        "metrics.jsonl",
        ".fedsim-run",  # the marker that lets --overwrite know fedsim made the folder
        "configs",  # the history of the configs the run has used
    } | optional
    assert (run_dir / "latest").read_text().strip() == "round_0003"
    assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == [
        "round_0001",
        "round_0002",
        "round_0003",
    ]
    for round_dir in (run_dir / "rounds").iterdir():
        assert {p.name for p in round_dir.iterdir()} == ROUND_FILES  # fedavg keeps no state
        assert checkpoint.verify_round(round_dir) is None

    info = json.loads((run_dir / "rounds/round_0002/round.json").read_text())
    assert info["round"] == 2 and info["num_clients"] == 3 and info["num_failed"] == 0
    assert info["config_hash"] == cfg.training_hash()
    assert set(info["files"]) == {"adapter_model.safetensors", "adapter_config.json"}
    assert info["aggregation"]["accepted"] == info["clients"]
    partition = json.loads((run_dir / "partition.json").read_text())
    assert info["partition_hash"] == partition["partition_hash"]
    counts = {str(c): partition["clients"][str(c)]["records"] for c in info["clients"]}
    assert info["aggregation"]["weights"] == counts
    assert info["samples"] == sum(counts.values())

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert all(m["train_loss"] > 0 for m in metrics)
    assert all(0 < m["checkpoint_seconds"] < m["seconds"] for m in metrics)
    assert config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())) == cfg


def test_rounds_record_resource_figures(reference_run):
    _, result = reference_run
    metrics = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["round"] for m in metrics] == [1, 2, 3]  # the loop below checks every round
    for m in metrics:
        info = json.loads(
            (
                result.run_dir / "rounds" / checkpoint.round_name(m["round"]) / "round.json"
            ).read_text()
        )
        # a process that imported torch holds well over 50 MiB; none of these needs 8 GiB
        for key in ("driver_peak_rss_mb", "worker_peak_rss_mb", "aggregator_peak_rss_mb"):
            assert 50 < m[key] < 8192, (key, m[key])
            assert info[key] == m[key], key
        # raw FedAvg: each of the 3 clients reads the global adapter and uploads one of its size
        adapter = info["bytes"]["adapter"]
        assert info["bytes_downlink"] == 3 * adapter and m["uplink_bytes"] == 3 * adapter
        assert m["object_store_bytes"] == info["object_store_bytes"] == 6 * adapter
    # peak RSS is a high-water mark: it never falls from one round to the next
    driver = [m["driver_peak_rss_mb"] for m in metrics]
    assert driver == sorted(driver)


def test_report_over_two_sizes_is_a_sweep(reference_run, tmp_path):
    from fedsim.report import write_report

    _, small = reference_run  # 6 clients, 3 per round
    raw = _experiment(
        tmp_path,
        run={"name": "twelve", "rounds": 1},
        data={"num_clients": 12, "partition": {"kind": "iid"}},
    )
    large = run_experiment(config_from_dict(raw), log=lambda _: None, show_progress=False)

    out = write_report([small.run_dir, large.run_dir], tmp_path / "report")
    assert (out / "sweep.png").stat().st_size > 10_000
    text = (out / "report.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 6 |")]
    rows += [line.split(" | ") for line in text.splitlines() if line.startswith("| 12 |")]
    # clients, per round, rounds, then figures the driver wrote (none of them missing)
    assert [r[:3] for r in rows] == [["| 6", "3", "3"], ["| 12", "3", "1"]]
    assert all("–" not in r[3:8] for r in rows), rows


def test_global_adapter_changes_every_round(reference_run):
    _, result = reference_run
    adapters = [_adapter(result.run_dir, r) for r in (1, 2, 3)]
    for before, after in itertools.pairwise(adapters):
        assert any(not torch.equal(before[k], after[k]) for k in before)
    # LoRA B starts at zero; after training it is not
    b_keys = [k for k in adapters[0] if "lora_B" in k]
    assert b_keys and all(adapters[0][k].abs().sum() > 0 for k in b_keys)


def test_resume_with_other_worker_count_equals_uninterrupted_run(reference_run, tmp_path):
    """Two rounds on one worker, then resume to three on two workers: bitwise the same adapters
    as three uninterrupted rounds on two workers, whatever order the updates arrived in. This
    run also probes held-out exact match after every round, which must change no bit either."""
    _, reference = reference_run
    raw = _experiment(
        tmp_path, run={"rounds": 2}, cluster={"num_workers": 1}, eval={"probe_per_category": 2}
    )
    lines: list[str] = []
    first = run_experiment(config_from_dict(raw), log=lines.append, show_progress=False)
    assert first.last_round == 2
    raw["run"]["rounds"], raw["cluster"]["num_workers"] = 3, 2
    resumed = run_experiment(config_from_dict(raw), resume=True, log=lines.append)
    assert (resumed.first_round, resumed.last_round) == (3, 3)
    for r in (1, 2, 3):
        _assert_same_adapter(_adapter(reference.run_dir, r), _adapter(first.run_dir, r))

    metrics = [json.loads(m) for m in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    test_categories = json.loads((first.run_dir / "partition.json").read_text())["test"]
    for m in metrics:
        by_category = m["exact_match_by_category"]
        assert by_category.keys() == test_categories["categories"].keys()
        assert 0 <= m["heldout_exact_match"] <= 1
        assert all(0 <= v <= 1 for v in by_category.values())
        round_json = first.run_dir / "rounds" / checkpoint.round_name(m["round"]) / "round.json"
        assert "heldout_exact_match" not in json.loads(round_json.read_text())
    round_lines = [line for line in lines if line.startswith("round ")]
    assert len(round_lines) == 3 and all("held-out exact match" in x for x in round_lines)
    assert all("heldout_exact_match" not in m for m in reference.metrics)  # off by default


def test_resume_falls_back_past_a_damaged_round(reference_run, tmp_path):
    _, reference = reference_run
    raw = _experiment(tmp_path, run={"rounds": 3})
    cfg = config_from_dict(raw)
    run_experiment(cfg, log=lambda _: None, show_progress=False)
    damaged = cfg.run_dir / "rounds/round_0003/adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-8])
    messages: list[str] = []
    result = run_experiment(cfg, resume=True, log=messages.append, show_progress=False)
    skipped = [m for m in messages if "skipping round_0003" in m]
    assert len(skipped) == 1 and str(damaged) in skipped[0] and "sha256" in skipped[0]
    assert (result.first_round, result.last_round) == (3, 3)
    _assert_same_adapter(_adapter(reference.run_dir, 3), _adapter(cfg.run_dir, 3))
    metrics = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["round"] for m in metrics] == [1, 2, 3]


def test_round_checkpoint_loads_with_peft(reference_run):
    from peft import PeftModel

    from fedsim.model import load_base_model, load_tokenizer

    _, result = reference_run
    round_dir = result.run_dir / "rounds" / "round_0003"
    base_path = json.loads((round_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    model = PeftModel.from_pretrained(load_base_model(base_path), str(round_dir))
    # PEFT keeps its initial weights for keys that do not match: compare every value, and make
    # sure the checkpoint's values are not what a fresh adapter holds anyway
    saved = assert_model_holds_the_file(model, round_dir / "adapter_model.safetensors")
    assert_differs_from_a_fresh_adapter(saved, round_dir)
    tokenizer = load_tokenizer(base_path)
    inputs = tokenizer(["Below is an instruction"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_resume_refuses_a_changed_config(reference_run, tmp_path):
    from fedsim.errors import FedsimInputError

    raw = _experiment(tmp_path, run={"rounds": 1})
    run_experiment(config_from_dict(raw), log=lambda _: None, show_progress=False)
    raw["client"]["lr"] = 0.5
    with pytest.raises(FedsimInputError, match="config differs"):
        run_experiment(config_from_dict(raw), resume=True, log=lambda _: None)
    raw["run"]["rounds"] = 2
    result = run_experiment(
        config_from_dict(raw),
        resume=True,
        allow_config_change=True,
        log=lambda _: None,
        show_progress=False,
    )
    assert result.last_round == 2
