"""Feature-based learning to rank: scorers, the listwise softmax loss, nDCG and ERR over padded lists.

Lists are padded tensors: ``features [B, L, F]``, ``labels [B, L]`` and ``mask [B, L]`` (True = a
real document). The IR metrics in ``zoo.blocks.metrics`` work on qrels and run dicts with
trec_eval's linear gain; learning to rank reports nDCG with the exponential gain ``2^y - 1``
and ERR (the ULTRA definitions), batched, so those live here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "LinearScorer",
    "MLPScorer",
    "build_scorer",
    "dcg_at_k",
    "err_at_k",
    "has_relevant",
    "list_metrics",
    "listwise_softmax_loss",
    "ndcg_at_k",
    "ranked_labels",
]

ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class LinearScorer(nn.Module):
    """s(x) = w·x + b."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features).squeeze(-1)


class MLPScorer(nn.Module):
    """An MLP with a scalar output; LayerNorm before every linear layer (the ULTRA ranker's layout)."""

    def __init__(self, n_features: int, hidden: Sequence[int] = (64, 32), activation: str = "elu",
                 layer_norm: bool = True) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; choose one of {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        width = n_features
        for out in [*hidden, 1]:
            if layer_norm:
                layers.append(nn.LayerNorm(width))
            layers.append(nn.Linear(width, out))
            if out != 1:
                layers.append(ACTIVATIONS[activation]())
            width = out
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).squeeze(-1)


def build_scorer(n_features: int, kind: str = "mlp", hidden: Sequence[int] = (64, 32), activation: str = "elu",
                 layer_norm: bool = True) -> nn.Module:
    if kind == "linear":
        return LinearScorer(n_features)
    if kind == "mlp":
        return MLPScorer(n_features, hidden, activation, layer_norm)
    raise ValueError(f"unknown scorer '{kind}'; choose linear or mlp")


def listwise_softmax_loss(scores: Tensor, labels: Tensor, mask: Tensor, eps: float = 1e-7) -> Tensor:
    """Softmax cross-entropy of each list against its labels, weighted by the list's label mass.

    Per list, ``-Σ_i (y_i + eps) log softmax(s)_i``; the batch loss divides the sum over lists by
    the batch's total ``Σ (y + eps)``. This is linear in the labels (up to that normaliser), so
    aggregated IPS labels and per-click IPS weights give the same objective.
    """
    weights = torch.where(mask, labels + eps, torch.zeros_like(labels))
    log_p = torch.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    per_list = -(weights * log_p.masked_fill(~mask, 0.0)).sum(-1)
    return per_list.sum() / weights.sum()


def ranked_labels(scores: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Labels and mask in the order of descending score; padding last, ties in input order."""
    order = torch.sort(scores.masked_fill(~mask, float("-inf")), dim=-1, descending=True, stable=True).indices
    return labels.gather(-1, order), mask.gather(-1, order)


def _discount(n: int, like: Tensor) -> Tensor:
    return 1.0 / torch.log2(torch.arange(2, n + 2, dtype=like.dtype, device=like.device))


def dcg_at_k(grades_in_rank_order: Tensor, valid: Tensor, k: int) -> Tensor:
    gains = torch.where(valid, 2.0 ** grades_in_rank_order - 1.0, torch.zeros_like(grades_in_rank_order))[..., :k]
    return (gains * _discount(gains.shape[-1], gains)).sum(-1)


def has_relevant(labels: Tensor, mask: Tensor) -> Tensor:
    """Lists with a document of grade > 0: the ones nDCG is defined on (trec_eval's convention)."""
    return ((labels > 0) & mask).any(-1)


def ndcg_at_k(scores: Tensor, labels: Tensor, mask: Tensor, k: int) -> Tensor:
    """nDCG@k with gain 2^y - 1; the ideal sorts the whole list by label. 0 where no label is > 0."""
    labels = labels.to(torch.float64)
    got, got_valid = ranked_labels(scores, labels, mask)
    ideal = torch.sort(labels.masked_fill(~mask, 0.0), dim=-1, descending=True).values
    idcg = dcg_at_k(ideal, torch.ones_like(mask), k)
    dcg = dcg_at_k(got, got_valid, k)
    return torch.where(idcg > 0, dcg / idcg.clamp_min(1e-12), torch.zeros_like(dcg))


def err_at_k(scores: Tensor, labels: Tensor, mask: Tensor, k: int, max_grade: int = 4) -> Tensor:
    """Expected reciprocal rank: Σ_j 1/j R_j Π_{l<j}(1 - R_l), R = (2^y - 1) / 2^max_grade."""
    got, got_valid = ranked_labels(scores, labels.to(torch.float64), mask)
    stop = torch.where(got_valid, (2.0 ** got - 1.0) / 2.0 ** max_grade, torch.zeros_like(got))[..., :k]
    reach = torch.cumprod(torch.cat([torch.ones_like(stop[..., :1]), 1.0 - stop[..., :-1]], dim=-1), dim=-1)
    ranks = torch.arange(1, stop.shape[-1] + 1, dtype=stop.dtype, device=stop.device)
    return (stop * reach / ranks).sum(-1)


def list_metrics(scores: Tensor, labels: Tensor, mask: Tensor, ks: Sequence[int] = (1, 3, 5, 10),
                 max_grade: int = 4) -> dict[str, Tensor]:
    """``{"ndcg@k": [B], "err@k": [B]}`` per list."""
    out: dict[str, Tensor] = {}
    for k in ks:
        out[f"ndcg@{k}"] = ndcg_at_k(scores, labels, mask, k)
        out[f"err@{k}"] = err_at_k(scores, labels, mask, k, max_grade)
    return out
