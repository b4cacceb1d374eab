"""Nothing fedsim writes needs unpickling, and secrets never reach its files or logs."""

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from safetensors.torch import load_file

import fedsim
from fedsim.config import config_from_dict
from fedsim.driver import run_experiment
from tests.conftest import tiny_experiment
from tests.unpickling_scan import scan_package

PACKAGE = Path(fedsim.__file__).parent
SECRET = "sk-fedsim-test-0123456789-do-not-leak"


def test_the_package_never_unpickles():
    """The AST scan (tested on snippets in test_unpickling_scan.py) over every fedsim module."""
    modules = set(PACKAGE.rglob("*.py"))
    assert PACKAGE / "server" / "privacy.py" in modules  # the scan reaches subpackages
    assert scan_package(PACKAGE) == []


def _load_safely(path: Path) -> None:
    """Open a run-directory file with the one safe reader its format has; fail on others."""
    name = path.name
    if name.endswith(".safetensors"):
        load_file(path)
    elif name.endswith(".jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".yaml"):
        yaml.safe_load(path.read_text())
    elif name.endswith(".arrow"):
        with pa.memory_map(str(path)) as source:
            pa.ipc.open_file(source).read_all()
    elif name == ".fedsim-run":  # fedsim's marker: JSON
        json.loads(path.read_text())
    elif name == "latest":
        assert path.read_text().strip().startswith("round_")
    else:
        raise AssertionError(f"{path}: a file of unknown format in the run directory")


@pytest.mark.ray
def test_run_files_load_without_pickle_and_hold_no_secret(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    raw = tiny_experiment(tmp_path, run={"rounds": 1})
    raw["eval"] = {"judge": {"api_key_env": "OPENAI_API_KEY"}}
    messages: list[str] = []
    result = run_experiment(config_from_dict(raw), log=messages.append, show_progress=False)

    files = [p for p in result.run_dir.rglob("*") if p.is_file()]
    assert len(files) >= 8
    for path in files:
        _load_safely(path)
        assert SECRET.encode() not in path.read_bytes(), path
    assert all(SECRET not in m for m in messages)
    assert "OPENAI_API_KEY" in (result.run_dir / "config.yaml").read_text()  # the name, only
