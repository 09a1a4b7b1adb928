"""A PyTorch Lightning zoo of recent LLM and information-retrieval papers."""
from __future__ import annotations

__version__ = "0.1.0"


def load(name_or_path: str, map_location: str = "cpu"):
    """A trained zoo module from a save_pretrained folder, a published `entry:tag`, or the index."""
    from zoo.base import ZooModule
    return ZooModule.from_pretrained(name_or_path, map_location=map_location)


__all__ = ["__version__", "load"]
