"""Diversity metrics over subtopic coverage: α-DCG/α-NDCG, ERR-IA, S-recall and the greedy ideal.

Everything is batched in torch. ``cov [B, N, T]`` is binary: document i of the query covers
subtopic t. Padded documents have all-zero rows and padded subtopics all-zero columns;
``topic_mask [B, T]`` says which columns are real subtopics (it matters for ERR-IA's uniform
intent weights and for S-recall's denominator) and ``doc_mask [B, N]`` which rows are real
documents. A ranking ``[B, N]`` lists document indices best first.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ERR_IA_WEIGHTS",
    "alpha_dcg",
    "alpha_dcg_cumulative",
    "alpha_gains",
    "alpha_ndcg",
    "err_ia",
    "greedy_ideal",
    "in_rank_order",
    "s_recall",
]

ERR_IA_WEIGHTS = ("uniform", "reference")


def in_rank_order(cov: Tensor, ranking: Tensor) -> Tensor:
    """Coverage rows in rank order: out[b, j] = cov[b, ranking[b, j]]."""
    return cov.gather(1, ranking[..., None].expand(-1, -1, cov.shape[-1]))


def _discount(n: int, like: Tensor) -> Tensor:
    return 1.0 / torch.log2(torch.arange(2, n + 2, dtype=like.dtype, device=like.device))


def alpha_gains(ranked_cov: Tensor, alpha: float) -> Tensor:
    """Gain at each rank, Σ_{t ∈ S(π_j)} (1-α)^{c_t(j)}, where c_t(j) counts the documents above j covering t."""
    ranked_cov = ranked_cov.to(torch.float64)
    seen_before = torch.cumsum(ranked_cov, dim=1) - ranked_cov
    return (ranked_cov * (1.0 - alpha) ** seen_before).sum(-1)


def alpha_dcg_cumulative(ranked_cov: Tensor, alpha: float) -> Tensor:
    """α-DCG@k for every k = 1..N at once, [B, N]."""
    gains = alpha_gains(ranked_cov, alpha)
    return torch.cumsum(gains * _discount(gains.shape[1], gains), dim=1)


def alpha_dcg(ranked_cov: Tensor, alpha: float, k: int | None = None) -> Tensor:
    cumulative = alpha_dcg_cumulative(ranked_cov, alpha)
    return cumulative[:, min(k or cumulative.shape[1], cumulative.shape[1]) - 1]


def greedy_ideal(cov: Tensor, alpha: float, doc_mask: Tensor | None = None) -> Tensor:
    """The ndeval ideal: at each rank the document with the largest marginal gain Σ_t (1-α)^{c_t}
    (ties to the lowest index); padded documents go last. Exact ideals are NP-hard; this is the
    standard normaliser and can fall short of the best permutation on rare cases."""
    cov = cov.to(torch.float64)
    n_batch, n_docs, _ = cov.shape
    available = torch.ones(n_batch, n_docs, dtype=torch.bool, device=cov.device)
    if doc_mask is not None:
        available &= doc_mask
    seen = torch.zeros(n_batch, cov.shape[2], dtype=cov.dtype, device=cov.device)
    ranking = torch.empty(n_batch, n_docs, dtype=torch.long, device=cov.device)
    rows = torch.arange(n_batch, device=cov.device)
    for j in range(n_docs):
        gain = (cov * (1.0 - alpha) ** seen[:, None, :]).sum(-1)
        # Unavailable documents score below any real one: -1 for padding still to place, -2 once placed.
        gain = torch.where(available, gain, torch.full_like(gain, -1.0))
        if j:
            gain[rows[:, None], ranking[:, :j]] = -2.0
        pick = gain.argmax(1)
        ranking[:, j] = pick
        seen += cov[rows, pick]
    return ranking


def alpha_ndcg(cov: Tensor, ranking: Tensor, k: int, alpha: float = 0.5, ideal: Tensor | None = None,
               doc_mask: Tensor | None = None) -> Tensor:
    """α-NDCG@k; ``ideal`` is the normalising ranking (default: the greedy ideal; the MA4DIV
    reference passes a stored permutation instead). 0 where the ideal α-DCG is 0."""
    if ideal is None:
        ideal = greedy_ideal(cov, alpha, doc_mask)
    got = alpha_dcg(in_rank_order(cov, ranking), alpha, k)
    best = alpha_dcg(in_rank_order(cov, ideal), alpha, k)
    return torch.where(best > 0, got / best.clamp_min(1e-300), torch.zeros_like(got))


def err_ia(cov: Tensor, ranking: Tensor, k: int, weights: str = "uniform", topic_mask: Tensor | None = None,
           doc_mask: Tensor | None = None) -> Tensor:
    """ERR-IA@k = Σ_t P(t|q) Σ_{j≤k} (1/j) R_{j,t} Π_{l<j} (1 - R_{l,t}) with binary grades (R = 0.5).

    ``uniform``: P(t|q) = 1/|T_q| (TREC's ndeval). ``reference``: P(t|q) = share of the query's
    candidate documents covering t, unnormalised (the MA4DIV code).
    """
    cov = cov.to(torch.float64)
    topic_mask = torch.ones(cov.shape[0], cov.shape[2], dtype=torch.bool, device=cov.device) \
        if topic_mask is None else topic_mask
    if weights == "uniform":
        intent = topic_mask.to(cov.dtype) / topic_mask.sum(-1, keepdim=True).clamp_min(1)
    elif weights == "reference":
        n_docs = cov.shape[1] if doc_mask is None else doc_mask.sum(-1, keepdim=True).to(cov.dtype)
        intent = cov.sum(1) / n_docs
    else:
        raise ValueError(f"unknown ERR-IA weights '{weights}'; choose one of {', '.join(ERR_IA_WEIGHTS)}")
    stop = 0.5 * in_rank_order(cov, ranking)[:, :k]
    reach = torch.cumprod(torch.cat([torch.ones_like(stop[:, :1]), 1.0 - stop[:, :-1]], dim=1), dim=1)
    ranks = torch.arange(1, stop.shape[1] + 1, dtype=cov.dtype, device=cov.device)
    per_topic = (stop * reach / ranks[None, :, None]).sum(1)
    return (intent * per_topic).sum(-1)


def s_recall(cov: Tensor, ranking: Tensor, k: int, topic_mask: Tensor | None = None) -> Tensor:
    """Share of the query's subtopics covered by the top k."""
    covered = in_rank_order(cov, ranking)[:, :k].amax(1) > 0
    if topic_mask is None:
        return covered.to(torch.float64).mean(-1)
    return (covered & topic_mask).sum(-1).to(torch.float64) / topic_mask.sum(-1).clamp_min(1)
