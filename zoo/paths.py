"""Where the zoo finds the repository, the shared evaluation data and its caches."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """`$ZOO_SHARED_DATA`, else `../shared/data` beside the repository."""
    return Path(os.environ.get("ZOO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def cache_dir() -> Path:
    """`$ZOO_CACHE`, else `~/.cache/zoo`: converted backbones, corpus embeddings, downloads."""
    path = Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "zoo"))
    path.mkdir(parents=True, exist_ok=True)
    return path
