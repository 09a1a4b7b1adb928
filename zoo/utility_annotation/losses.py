"""Multi-positive contrastive losses: InfoNCE with one (random) positive, Conj-InfoNCE and Disj-InfoNCE.

Scores S (B x C) of every query against every candidate of the (global) batch and a boolean target
T (B x C) marking each query's positives. For row b with positives D+ and p = softmax(S_b):

- ``infonce_single``: -log p(d+) for one positive drawn uniformly per row; the row's other positives
  are removed from the softmax, as if they were not in the batch (the "Rand1" baseline);
- ``conj``: -sum_{d+} log p(d+) (joint likelihood; ``conj_reduction="mean"`` divides by |D+|);
- ``disj``: -log sum_{d+} p(d+) = logsumexp(S_b) - logsumexp(S_b[D+]) (summed marginal likelihood).

Rows without a positive are skipped; the batch loss is the mean over the remaining rows (a finite,
differentiable zero when none remains).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from zoo.blocks.distributed import gather_with_grad

MODES = ("infonce_single", "conj", "disj")
CONJ_REDUCTIONS = ("sum", "mean")


def _rows_with_a_positive(scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    valid = target.any(dim=1)
    return scores.float()[valid], target[valid]


def disj_infonce(scores: Tensor, target: Tensor) -> Tensor:
    """-log of the softmax mass on each row's positives, averaged over rows with a positive."""
    kept, positives = _rows_with_a_positive(scores, target)
    if kept.shape[0] == 0:
        return scores.sum() * 0.0
    per_row = torch.logsumexp(kept, dim=1) - torch.logsumexp(kept.masked_fill(~positives, float("-inf")), dim=1)
    return per_row.mean()


def conj_infonce(scores: Tensor, target: Tensor, reduction: str = "sum") -> Tensor:
    """-sum (or mean) over each row's positives of log softmax, averaged over rows with a positive."""
    if reduction not in CONJ_REDUCTIONS:
        raise ValueError(f"unknown conj_reduction '{reduction}'; choose one of {CONJ_REDUCTIONS}")
    kept, positives = _rows_with_a_positive(scores, target)
    if kept.shape[0] == 0:
        return scores.sum() * 0.0
    per_row = -(torch.log_softmax(kept, dim=1) * positives).sum(dim=1)
    if reduction == "mean":
        per_row = per_row / positives.sum(dim=1)
    return per_row.mean()


def single_infonce(scores: Tensor, target: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """InfoNCE on one uniformly drawn positive per row; the row's other positives leave the softmax."""
    kept, positives = _rows_with_a_positive(scores, target)
    if kept.shape[0] == 0:
        return scores.sum() * 0.0
    chosen = torch.multinomial(positives.float(), 1, generator=generator).squeeze(1)
    others = positives.clone()
    others[torch.arange(kept.shape[0], device=kept.device), chosen] = False
    logits = kept.masked_fill(others, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, chosen[:, None]).squeeze(1)).mean()


def group_target(labels: Tensor, n_columns: int, offset: int = 0) -> Tensor:
    """B x n_columns target: query b's multi-hot group labels at columns offset + b*G + g."""
    n_queries, group = labels.shape
    target = torch.zeros(n_queries, n_columns, dtype=torch.bool, device=labels.device)
    columns = offset + torch.arange(n_queries, device=labels.device)[:, None] * group + torch.arange(
        group, device=labels.device)
    target.scatter_(1, columns, labels > 0)
    return target


class MultiPositiveContrastiveLoss(nn.Module):
    """Embeddings in, loss out: each query against its own group (``labels`` B x G multi-hot, its
    positives) and every other document of the batch (negatives). With ``gather_across_devices``
    other ranks' documents (their positives included) are negatives too."""

    def __init__(self, mode: str = "disj", temperature: float = 0.05, conj_reduction: str = "sum",
                 gather_across_devices: bool = False) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown multi-positive loss '{mode}'; choose one of {MODES}")
        if conj_reduction not in CONJ_REDUCTIONS:
            raise ValueError(f"unknown conj_reduction '{conj_reduction}'; choose one of {CONJ_REDUCTIONS}")
        self.mode = mode
        self.temperature = temperature
        self.conj_reduction = conj_reduction
        self.gather_across_devices = gather_across_devices

    def from_scores(self, scores: Tensor, target: Tensor) -> Tensor:
        if self.mode == "disj":
            return disj_infonce(scores, target)
        if self.mode == "conj":
            return conj_infonce(scores, target, self.conj_reduction)
        return single_infonce(scores, target)

    def forward(self, queries: Tensor, docs: Tensor, labels: Tensor) -> Tensor:
        n_queries = queries.shape[0]
        if docs.shape[0] != labels.numel() or labels.shape[0] != n_queries:
            raise ValueError(f"multi-positive loss needs labels of shape (queries, group): {n_queries} queries, "
                             f"{docs.shape[0]} documents, labels {tuple(labels.shape)}")
        offset = 0
        if self.gather_across_devices:
            docs, offset = gather_with_grad(docs)
        scores = queries @ docs.T / self.temperature
        return self.from_scores(scores, group_target(labels, docs.shape[0], offset))
