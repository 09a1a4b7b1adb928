"""BOOM's sub-model: the shared bi-encoder, trained on one seeded data subset (arXiv 2602.05787).

BOOM adds no loss: each sub-model is ``zoo.dense``'s InfoNCE bi-encoder trained on the subset the
datamodule (``datamodules.boom.BoomDataModule``) samples; ``zoo.boom.runner.BoomRunner`` trains
several from the same base weights and merges them. ``provenance`` records how a merged checkpoint
was made (sub-model subsets, merge method and weights, training cost), so its card says so.
"""
from __future__ import annotations

from typing import Any

from zoo.dense.module import DenseRetrieverModule


class BoomModule(DenseRetrieverModule):
    """Hooks to override: those of ``DenseRetrieverModule``."""

    zoo_name = "boom"
    card_notes = (
        "Bagging-based model merging: sub-models trained from the same base weights on seeded subsets of the "
        "training data (per dataset, without replacement; `data.bootstrap=true` samples with replacement) are "
        "merged tensor by tensor with MergeKit's Multi-SLERP (equal weights, no base; `merge_weights="
        "size_proportional`, `merge_base=pretrained`, `merge_method=linear|task_arithmetic` are switches). The "
        "incremental update trains on the new data plus a 40% historical core subset from the base weights and "
        "merges that model with the old one. With MiniLM: mean pooling, temperature 0.05, no query instruction."
    )

    def __init__(self, provenance: dict[str, Any] | None = None, **base: Any) -> None:
        super().__init__(**base)
