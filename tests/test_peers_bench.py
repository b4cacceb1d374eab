"""benchmarks/peers.py's measuring parts, without running a variant or installing a peer."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["peers"]


def test_descendants_walks_the_whole_tree(peers):
    tree = {1: [2, 3], 2: [4], 4: [5], 3: [], 5: [], 9: [10]}
    assert peers.descendants(1, children=lambda pid: tree.get(pid, [])) == {1, 2, 3, 4, 5}


def test_descendants_of_a_real_process_tree(peers):
    # a shell whose child sleeps: both are found from this process
    shell = subprocess.Popen(["sh", "-c", "sleep 5 & wait"])
    try:
        for _ in range(100):
            found = peers.descendants(os.getpid())
            if len(found - {os.getpid(), shell.pid}) >= 1:
                break
            subprocess.run(["sleep", "0.02"])
        assert shell.pid in found
        assert len(found - {os.getpid(), shell.pid}) >= 1  # the sleep
        assert peers.pss_kib(shell.pid) > 0
    finally:
        shell.kill()
        shell.wait()


def test_pss_reads_smaps_rollup(peers, tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "smaps_rollup").write_text(
        "55d0-7ffd ---p 00000000 00:00 0  [rollup]\nRss:  2048 kB\nPss:  1536 kB\n"
    )
    assert peers.pss_kib(42, proc=tmp_path) == 1536
    assert peers.pss_kib(43, proc=tmp_path) == 0  # gone


def test_table_ranges_ratios_and_failures(peers):
    runs = [
        {"pair": 0, "variant": "plain", "ok": True, "wall_s": 10.0, "peak_pss_mb": 600.0},
        {"pair": 1, "variant": "plain", "ok": True, "wall_s": 20.0, "peak_pss_mb": 640.0},
        {"pair": 0, "variant": "fedsim-1x2", "ok": True, "wall_s": 15.0, "peak_pss_mb": 1800.0},
        {"pair": 1, "variant": "fedsim-1x2", "ok": True, "wall_s": 25.0, "peak_pss_mb": 1900.0},
        {"pair": 0, "variant": "pfl", "ok": False, "error": "environment not built: no wheel"},
    ]
    notes = {"pfl": "environment not built: no wheel", "fedsim-1x2": "fedsim 0.1"}
    lines = peers.summarise(runs, ["plain", "pfl", "fedsim-1x2"], notes).splitlines()
    d = peers.DESCRIPTIONS
    assert lines[2] == f"| plain: {d['plain']} | 10.0-20.0 s | 1.00 | 600-640 MB |"
    assert lines[3] == f"| pfl: {d['pfl']} | environment not built: no wheel | - | - |"
    assert lines[4] == (
        f"| fedsim-1x2: {d['fedsim-1x2']} (fedsim 0.1) | 15.0-25.0 s | 1.25-1.50 | 1,800-1,900 MB |"
    )


def test_the_script_imports_nothing_heavy_at_module_level():
    # the peers' environments have no fedsim, and the parent must not pay for imports it does
    # not need before a variant starts
    script = str(ROOT / "benchmarks" / "peers.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('peers', {script!r})\n"
        "m = sys.modules['peers'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "print(sorted(n for n in ('torch', 'fedsim', 'transformers', 'ray') if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_peer_whose_environment_fails_is_reported(peers, tmp_path, monkeypatch):
    def pip_fails(step, **_):
        rc = 1 if "flwr[simulation]" in step else 0
        return subprocess.CompletedProcess(step, rc, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(peers.subprocess, "run", pip_fails)
    python, note = peers.ensure_venv(tmp_path, "flower", ["flwr[simulation]", "peft==0.21.2"])
    assert python is None
    assert note.startswith("environment not built: ")
    assert note.endswith("ERROR: No matching distribution found")
    assert not (tmp_path / "flower" / ".installed").exists()
