"""The shared bi-encoder trained on multi-positive groups (``batch["labels"]``, B x G multi-hot).

Utility-focused annotation changes the labels, not the model: an LLM selects the passages useful for
answering each query, and the retriever learns from all of them with Disj-InfoNCE (the summed
probability of the positive set), which lets a positive the model scores far below the others, often a
wrong label, go almost unpushed. ``loss`` switches to Conj-InfoNCE or single-positive InfoNCE.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zoo.dense.module import DenseRetrieverModule
from zoo.utility_annotation.losses import MultiPositiveContrastiveLoss


class UtilityRetrieverModule(DenseRetrieverModule):
    """Hooks to override: the base's ``format_query``, ``format_doc``, ``embed_*``, ``extend_eval_runs``;
    ``group_labels`` (the multi-hot labels of a batch) and ``contrastive_loss``."""

    zoo_name = "utility_annotation"
    card_notes = (
        "Bi-encoder trained on LLM utility labels with Disj-InfoNCE (`loss=disj`; `conj` and `infonce_single` "
        "are the paper's comparisons). Our interpretations (the paper body was not read): the single-positive "
        "baseline draws one positive per row at random and drops the row's other positives from its softmax; "
        "Conj-InfoNCE sums over positives (`conj_reduction=mean` averages); with normalised MiniLM embeddings "
        "the temperature is 0.05 (the reference uses 1.0 on unnormalised dot products). Labels come from the "
        "datamodule (`label_source` human | llm_* | mixture; 20% human mixture in curriculum order by default)."
    )

    def __init__(self, loss: str = "disj", conj_reduction: str = "sum", **base: Any) -> None:
        super().__init__(**base)
        self.multi_positive = MultiPositiveContrastiveLoss(loss, self.hparams.temperature, conj_reduction,
                                                           self.hparams.gather_across_devices)

    def group_labels(self, batch: dict[str, Any], group: int) -> Tensor:
        """B x G multi-hot positives; a batch without ``labels`` has one positive per group."""
        labels = batch.get("labels")
        if labels is not None:
            return labels
        positive = batch["positive"]
        return torch.nn.functional.one_hot(positive, group).to(torch.float)

    def contrastive_loss(self, queries: Tensor, docs: Tensor, batch: dict[str, Any]) -> Tensor:
        """``docs``: each query's group in batch order; ``batch["labels"]`` marks its positives."""
        return self.multi_positive(queries, docs, batch["labels"])

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        q = self.embed_queries(batch["query"])
        d = self.embed_docs(batch["docs"])
        labels = self.group_labels(batch, d.shape[0] // q.shape[0]).to(q.device)
        loss = self.contrastive_loss(q, d, {**batch, "labels": labels})
        return {self.hparams.loss: loss, "loss": loss,
                "positives_per_query": (labels > 0).sum(dim=1).float().mean()}
