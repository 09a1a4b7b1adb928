"""GenCRF's query aggregators (Eq. 4, 5, 7, 8) and the QERM decision rule, as pure functions.

Dynamic weights are lists aligned with Q_final; a dropped query has weight 0.0. The retrieval
vector is w0 * E(q_init) + sum_i w_i * E(q_f,i); ranking is by dot product, so only the ratios
between w0 and the w_i matter.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

SEP = " [SEP] "


def simdw_weights(similarities: Sequence[float], threshold: float = 0.2) -> list[float]:
    """SimDW (Eq. 4): the cosine similarity itself, kept when >= threshold."""
    return [float(s) if s >= threshold else 0.0 for s in similarities]


def scoredw_weights(scores: Sequence[float] | None, num_queries: int, threshold: float = 60.0,
                    scale: float = 100.0) -> list[float]:
    """ScoreDW (Eq. 5): s_i / scale when s_i >= threshold. Extra scores are ignored; clusters
    without a score (a short list, or None) get 0 and are dropped."""
    scores = list(scores or [])[:num_queries]
    scores += [float("-inf")] * (num_queries - len(scores))
    return [float(s) / scale if s >= threshold else 0.0 for s in scores]


def fw_weights(w0: float, num_queries: int) -> list[float]:
    """FW (Eq. 8): the remaining 1 - w0 shared equally by the refined queries."""
    return [(1.0 - w0) / num_queries] * num_queries if num_queries else []


def aggregate(init_embedding: torch.Tensor, final_embeddings: torch.Tensor, w0: float,
              weights: Sequence[float]) -> torch.Tensor:
    """w0 * E(q_init) + sum_i weights[i] * E(q_f,i) for one query ([D] and [K, D] -> [D])."""
    vector = w0 * init_embedding.float()
    if len(weights):
        w = torch.as_tensor(list(weights), dtype=torch.float32)
        vector = vector + (w[:, None] * final_embeddings.float()).sum(0)
    return vector


def dc_text(query: str, finals: Sequence[str]) -> str:
    """DC (Eq. 7): "q [SEP] a [SEP] b [SEP]"."""
    return query + SEP + "".join(f + SEP for f in finals).rstrip()


def qerm_text(query: str, finals: Sequence[str], sep: str = " </s> ") -> str:
    """The QERM classifier's input: the initial query and its refined queries (spec, ambiguity 4)."""
    return sep.join([query, *finals])


def qerm_labels(ndcgs: Sequence[float], tau: float) -> list[int]:
    """y = 1[nDCG@10 >= tau] (1 = good round, 0 = needs regeneration)."""
    return [int(v >= tau) for v in ndcgs]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of no values")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def passes(logit: float, epsilon: float) -> bool:
    """Algorithm 1: stop regenerating when the round's QERM logit reaches epsilon."""
    return logit >= epsilon


def chosen_round(logits: Sequence[float], epsilon: float, on_no_pass: str = "best") -> int:
    """Index of the round whose retrieval is returned: the first that passes; if none does,
    the highest-logit round (``best``, our choice) or the last one (``last``)."""
    for t, z in enumerate(logits):
        if passes(z, epsilon):
            return t
    if on_no_pass == "last":
        return len(logits) - 1
    return max(range(len(logits)), key=lambda t: logits[t])
