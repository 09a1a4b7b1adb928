"""MergeMix: choose mid-training data-mixture ratios by merging domain experts (arXiv 2601.17858).

``MergeMixModule`` trains a causal LM on a domain mixture and scores its capabilities in its test step;
``MergeMixSearch`` runs the pipeline (base -> experts -> seed merges -> surrogates -> simplex search ->
verified lambda*); ``simplex``, ``surrogate`` and ``theory`` hold the pure helpers.
"""
from zoo.mergemix.module import MergeMixModule
from zoo.mergemix.search import MergeMixSearch, SearchResult, merge_experts

__all__ = ["MergeMixModule", "MergeMixSearch", "SearchResult", "merge_experts"]
