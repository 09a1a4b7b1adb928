import os
from pathlib import Path

import pytest

from zoo.paths import shared_data_dir


@pytest.fixture
def shared_data() -> Path:
    """The real evaluation data; skipped where absent, a failure where CI requires it."""
    root = shared_data_dir()
    if not root.is_dir():
        message = f"shared evaluation data not found at {root} (set ZOO_SHARED_DATA)"
        if os.environ.get("ZOO_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "zoo-cache"))
