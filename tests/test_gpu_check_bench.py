"""benchmarks/gpu_check.py on the CPU with its tiny shape: every variant runs, reports positive
tokens/s, writes JSON, and no process of it imports Ray. The figures themselves mean nothing."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
FEW_STEPS = ["--shape", "tiny", "--warmup", "1", "--min-steps", "2", "--max-steps", "2"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def run_script(tmp_path: Path, *flags: str) -> tuple[str, dict]:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *FEW_STEPS, *flags, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(out.read_text())


def check(stdout: str, report: dict, variants: list[str]) -> None:
    assert [r["variant"] for r in report["rows"]] == variants
    table = stdout[stdout.index("variant ") :].splitlines()
    assert [line.split()[0] for line in table[1 : 1 + len(variants)]] == variants
    assert "elapsed" in table[-1]
    for row in report["rows"]:
        assert row["ok"], row
        assert row["tokens_per_s"] > 0
        assert len(row["per_process_tokens_per_s"]) == row["procs"]
        assert all(rate > 0 for rate in row["per_process_tokens_per_s"])
        assert all(p["tokens"] == 2 * 4 * 64 for p in row["processes"])  # 2 steps x 4 x 64
        assert not row["ray_imported"]
    assert not report["ray_imported"]
    assert report["shape"] == "tiny" and report["parameters"] > 0


@pytest.mark.slow  # ~35 s of CPU (three processes loading torch): the default tier is at its budget
def test_plain_and_torch_variants_run_without_ray(tmp_path):
    stdout, report = run_script(tmp_path, "--variants", "plain,torch", "--procs", "2")
    check(stdout, report, ["plain", "torch", "torch-x2"])


@pytest.mark.slow
def test_every_variant_runs_without_ray(tmp_path):
    """DeepSpeed's import and engine (and its JIT op, the first time) and 4 processes on 2
    cores: a minute or more."""
    stdout, report = run_script(tmp_path)
    check(stdout, report, ["plain", "torch", "torch-x2", "torch-x4", "deepspeed"])


def test_the_budget_shortens_the_timed_steps(gpu_check):
    # 300 s left for 3 variants that each cost 40 s to start: 60 s of timed steps each
    assert gpu_check.measure_seconds(300, 40, 3) == 60
    assert gpu_check.measure_seconds(-80, 40, 3) == 0  # over budget: the minimum
    assert gpu_check.plan_steps(60, 0.1, 1, 3, 200) == 200  # capped
    assert gpu_check.plan_steps(60, 0.5, 1, 3, 200) == 120
    assert gpu_check.plan_steps(60, 0.5, 4, 3, 200) == 30  # 4 processes share the device
    assert gpu_check.plan_steps(0, 0.5, 1, 3, 200) == 3


def test_the_table_names_a_failed_variant(gpu_check):
    ok = {
        "variant": "plain",
        "ok": True,
        "procs": 1,
        "steps": 5,
        "tokens_per_s": 1000.0,
        "per_process_tokens_per_s": [1000.0],
        "peak_mb": [10.0],
    }
    failed = {"variant": "deepspeed", "ok": False, "procs": 1, "error": "x:\nImportError: no"}
    lines = gpu_check.table([ok, failed], cuda=True).splitlines()
    assert "peak CUDA MB" in lines[0]
    assert lines[1].split()[:6] == ["plain", "1", "5", "1,000", "1,000", "1.00"]
    assert lines[2].split()[:2] == ["deepspeed", "1"] and "ImportError: no" in lines[2]


def test_a_variant_that_cannot_start_in_the_budget_left_is_skipped(gpu_check, tmp_path):
    budget = gpu_check.Budget(10.0)
    budget.saw(30.0)  # starting a variant takes longer than the whole budget
    saved = []
    plan = [("plain", "plain", 1), ("torch-x2", "torch", 2)]
    rows = gpu_check.run_plan(None, plan, budget, tmp_path, saved.append)
    assert [(r["variant"], r["ok"], r["procs"]) for r in rows] == [
        ("plain", False, 1),
        ("torch-x2", False, 2),
    ]
    assert all(r["error"].startswith("skipped") for r in rows)
    assert saved[-1] == rows and not list(tmp_path.iterdir())  # nothing started
