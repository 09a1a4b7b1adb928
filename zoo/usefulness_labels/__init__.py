"""CLUE (arXiv 2506.08626): usefulness labels for clicked documents from a top-down cascade of LLM
judgments with behaviour and context, and satisfaction prediction from those labels."""
from zoo.usefulness_labels.cascade import (
           majority,
           parse_bracket_ids,
           parse_level,
           run_cascade,
)
from zoo.usefulness_labels.metrics import agreement, cohen_kappa
from zoo.usefulness_labels.module import CLUEModule
from zoo.usefulness_labels.satisfaction import SatisfactionPredictor, query_features

__all__ = ["CLUEModule", "SatisfactionPredictor", "agreement", "cohen_kappa", "majority", "parse_bracket_ids",
           "parse_level", "query_features", "run_cascade"]
