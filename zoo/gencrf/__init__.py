"""GenCRF (arXiv 2409.10909): generative clustering and reformulation with weighted dense aggregation."""
from zoo.gencrf.module import GenCRFModule
from zoo.gencrf.qerm import QERMModule

__all__ = ["GenCRFModule", "QERMModule"]
