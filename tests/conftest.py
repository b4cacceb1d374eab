"""Fixtures shared by every test package."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Shared data folder (Dolly and its reference split): `FEDSIM_DATA_DIR`, or ../shared/data
    next to the repository. Tests that need a file in it skip themselves when it is absent."""
    return Path(
        os.environ.get("FEDSIM_DATA_DIR") or Path(__file__).parents[1].parent / "shared" / "data"
    )
