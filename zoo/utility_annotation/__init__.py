"""Utility-focused LLM annotation (arXiv 2504.05220): LLM-selected useful passages as multiple, noisy
positives for a bi-encoder trained with Disj-InfoNCE."""
from zoo.utility_annotation.losses import MultiPositiveContrastiveLoss
from zoo.utility_annotation.module import UtilityRetrieverModule

__all__ = ["MultiPositiveContrastiveLoss", "UtilityRetrieverModule"]
