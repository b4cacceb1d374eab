"""Fixtures of the fuzzers."""

from pathlib import Path

import pytest


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp folder that is also the working directory, so that a relative path a fuzzed config
    names (run.output_dir: foo) lands inside the folder whose snapshot is compared."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
