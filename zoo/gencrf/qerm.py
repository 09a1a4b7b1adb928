"""QERM: the Query Evaluation Rewarding Model, a binary classifier over (q_init, Q_final).

Input text: "q_init <sep> q_f,1 <sep> q_f,2 <sep> q_f,3" with the backbone tokenizer's separator
(RoBERTa's </s> in the paper's setting); output: one logit z, trained with binary cross-entropy
on y = 1[nDCG@10 >= tau] (label 0 = "regenerate").
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.backbones import build_backbone
from zoo.base import ZooModule
from zoo.blocks.encoder import EmbeddingEncoder
from zoo.gencrf.aggregation import qerm_text


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC as the probability that a positive outscores a negative (ties count half); 0.5
    when one class is absent."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


class QERMModule(ZooModule):
    """Hooks: ``format`` (what the classifier reads), ``logits`` (texts -> [B]), ``loss``."""

    zoo_name = "gencrf"
    card_notes = ("QERM of GenCRF (Algorithm 1): a sequence classifier (CLS pooling + linear head) trained "
                  "with BCE on y = 1[nDCG@10 >= tau] of round-1 GenCRF retrievals; the input format is the "
                  "zoo's interpretation (the paper does not give it).")

    def __init__(
        self,
        backbone: str = "tiny-bert",
        backbone_overrides: dict | None = None,
        pooling: str = "cls",
        max_length: int = 512,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        model, tokenizer = build_backbone(backbone, config_overrides=backbone_overrides)
        self.encoder = EmbeddingEncoder(model, tokenizer, pooling=pooling, normalize=False, max_length=max_length)
        self.head = nn.Linear(self.encoder.dim, 1)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def backbone_parts(self) -> tuple[Any, Any]:
        return self.encoder.backbone, self.encoder.tokenizer

    def format(self, query: str, finals: Sequence[str]) -> str:
        sep = self.encoder.tokenizer.sep_token or "</s>"
        return qerm_text(query, finals, sep=f" {sep} ")

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        return self.head(self.encoder.embed(list(texts))).squeeze(-1)

    @torch.no_grad()
    def score(self, queries: Sequence[str], finals: Sequence[Sequence[str]]) -> list[float]:
        was_training = self.training
        self.eval()
        out = self.logits([self.format(q, f) for q, f in zip(queries, finals)]).float().cpu().tolist()
        self.train(was_training)
        return out

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def _logits_of(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.logits([self.format(q, f) for q, f in zip(batch["query"], batch["finals"])])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self._logits_of(batch), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self._logits_of(batch).detach().float().cpu()
        self._val.append((logits, batch["label"].float().cpu()))
        self.accumulate_metrics({"loss": float(self.loss(logits, batch["label"].cpu())) * len(logits),
                                 "accuracy": ((logits >= 0).float() == batch["label"].cpu()).sum()}, len(logits))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def _finish(self, prefix: str) -> dict[str, float]:
        metrics = self.reduce_metrics(prefix, prog_bar="auc")
        if self._val:
            logits = torch.cat([z for z, _ in self._val])
            labels = torch.cat([y for _, y in self._val])
            # Per-rank statistics: each rank sees its own shard (exact on one process).
            extra = {f"{prefix}/auc": binary_auc(logits, labels),
                     f"{prefix}/regenerated_fraction": float((logits < logits.mean()).float().mean())}
            for key, value in extra.items():
                self.log(key, value)
            metrics.update(extra)
        self._val = []
        return metrics

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._finish("test")
