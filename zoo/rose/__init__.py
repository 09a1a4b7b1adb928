"""ROSE: semantic-entropy tree rollouts with length-aware segment advantages (arXiv 2601.05053)."""
from zoo.rose.module import ROSEModule

__all__ = ["ROSEModule"]
