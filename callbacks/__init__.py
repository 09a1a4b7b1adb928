"""Lightning callbacks and strategies usable with any zoo module."""
from callbacks.rng import RNGState

__all__ = ["RNGState"]
