"""Contrastive and ranking losses over embeddings and scores (each knows nothing of models)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.blocks.distributed import gather_with_grad

RANKNET_REDUCTIONS = ("pair_mean", "query_sum")


class InfoNCELoss(nn.Module):
    """InfoNCE over in-batch, hard and (optionally) cross-device negatives.

    ``docs`` holds ``group_size`` rows per query, positive first, then its hard negatives:
    row ``i * group_size`` is query i's positive; every other row is a negative for it.
    With ``gather_across_devices`` each rank scores its own queries against every rank's
    documents; DDP's gradient averaging then gives the global-batch gradient.
    """

    def __init__(self, temperature: float = 0.03, gather_across_devices: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_across_devices = gather_across_devices

    def forward(self, queries: Tensor, docs: Tensor) -> Tensor:
        n_queries = queries.shape[0]
        if docs.shape[0] % n_queries:
            raise ValueError(f"InfoNCE needs a whole group of documents per query: "
                             f"{docs.shape[0]} documents for {n_queries} queries")
        group_size = docs.shape[0] // n_queries
        offset = 0
        if self.gather_across_devices:
            docs, offset = gather_with_grad(docs)
        logits = queries @ docs.T / self.temperature
        targets = offset + torch.arange(n_queries, device=queries.device) * group_size
        return F.cross_entropy(logits, targets)


class RankNetLoss(nn.Module):
    """Pairwise logistic loss against a teacher order.

    ``order[b, r]`` is the index (into ``scores[b]``) of the document the teacher ranks r-th,
    best first; -1 pads shorter lists. Every pair (j ahead of k) adds
    softplus(scale * (s_k - s_j)). ``pair_mean`` averages over all valid pairs in the batch
    (E2Rank's code); ``query_sum`` sums over pairs and averages over queries (its paper).
    """

    def __init__(self, scale: float = 10.0, reduction: str = "pair_mean") -> None:
        super().__init__()
        if reduction not in RANKNET_REDUCTIONS:
            raise ValueError(f"unknown RankNet reduction '{reduction}'; choose one of {RANKNET_REDUCTIONS}")
        self.scale = scale
        self.reduction = reduction

    @staticmethod
    def teacher_positions(order: Tensor, n_docs: int) -> Tensor:
        """position[b, j] = teacher rank of document j, or n_docs when the teacher left it out."""
        positions = torch.full((order.shape[0], n_docs + 1), n_docs, dtype=torch.long, device=order.device)
        ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
        # Padding (-1) is written into a spare last column and dropped.
        positions.scatter_(1, order.clamp(min=-1) % (n_docs + 1), ranks)
        return positions[:, :n_docs]

    def pair_mask(self, order: Tensor, n_docs: int) -> Tensor:
        positions = self.teacher_positions(order, n_docs)
        ranked = positions < n_docs
        ahead = positions[:, :, None] < positions[:, None, :]
        return ahead & ranked[:, :, None] & ranked[:, None, :]

    def forward(self, scores: Tensor, order: Tensor) -> Tensor:
        mask = self.pair_mask(order, scores.shape[1])
        # diff[b, j, k] = s_k - s_j: positive when the worse document outscores the better one.
        diff = scores[:, None, :] - scores[:, :, None]
        losses = F.softplus(self.scale * diff)[mask]
        if losses.numel() == 0:
            return scores.sum() * 0.0
        if self.reduction == "pair_mean":
            return losses.mean()
        return losses.sum() / scores.shape[0]

