"""Ranking metrics with trec_eval semantics.

torchmetrics' retrieval metrics only see the retrieved list, so a relevant document
that was never retrieved neither counts in the recall denominator nor raises the
ideal DCG. trec_eval (and every published number) counts it, hence these.

Conventions, all as trec_eval:
* a run is ranked by score descending, ties broken by docid descending;
* a document is relevant when its qrels grade is > 0; nDCG's gain is the grade
  (linear, negatives count as 0), discounted by log2(rank + 1), and the ideal ranking
  is built from every judged document of the query;
* the evaluated queries are those in qrels with at least one relevant document; one
  missing from the run scores 0 on every metric.

Metric names are ``name`` or ``name@k`` (k = cutoff; no cutoff = the whole run):
ndcg, mrr, recall, map (AP; map@k stops at rank k but still divides by all relevant
documents, as trec_eval's map_cut).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["METRIC_NAMES", "evaluate_run", "parse_metric", "per_query"]

METRIC_NAMES = ("ndcg", "mrr", "recall", "map")

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def parse_metric(metric: str) -> tuple[str, int | None]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``; ``"map"`` -> ``("map", None)``."""
    name, at, cutoff = metric.strip().lower().partition("@")
    if name not in METRIC_NAMES:
        valid = ", ".join(METRIC_NAMES)
        raise ValueError(f"unknown metric {metric!r}; valid names: {valid} (optionally @k, e.g. ndcg@10)")
    if not at:
        return name, None
    if not cutoff.isdigit() or int(cutoff) < 1:
        raise ValueError(f"metric {metric!r}: the cutoff after '@' must be a positive integer")
    return name, int(cutoff)


def _rank(scores: Mapping[str, float]) -> list[str]:
    # reverse=True on (score, docid) gives score desc, then docid desc: trec_eval's order.
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def per_query(
    qrels: Qrels, run: Run, metrics: Iterable[str] = ("ndcg@10", "mrr@10", "recall@100", "map")
) -> dict[str, dict[str, float]]:
    """``{metric: {qid: value}}`` over the qrels queries that have a relevant document."""
    metrics = list(metrics)
    parsed = [parse_metric(m) for m in metrics]
    qids = [qid for qid, judged in qrels.items() if any(rel > 0 for rel in judged.values())]
    if not qids:
        return {metric: {} for metric in metrics}

    # Only as deep as the deepest cutoff is needed, unless some metric has none.
    longest_run = max((len(run.get(qid, ())) for qid in qids), default=0)
    cutoffs = [k for _, k in parsed]
    # At least one column, all zeros for an empty run, so every array op has a rank to see.
    depth = max(1, longest_run if None in cutoffs else min(longest_run, max(cutoffs)))

    # grades[i, r]: qrels grade of the doc at rank r + 1 of query i (0 past the run's end,
    # which is exactly how a not-retrieved rank counts in every metric).
    grades = np.zeros((len(qids), depth))
    ideal_depth = max(len(qrels[qid]) for qid in qids)
    ideal = np.zeros((len(qids), ideal_depth))
    for i, qid in enumerate(qids):
        judged = qrels[qid]
        ranked = _rank(run.get(qid, {}))[:depth]
        grades[i, : len(ranked)] = [judged.get(doc, 0) for doc in ranked]
        ideal[i, : len(judged)] = sorted(judged.values(), reverse=True)
    gains = np.clip(grades, 0, None)
    ideal = np.clip(ideal, 0, None)
    relevant = grades > 0
    n_relevant = (ideal > 0).sum(axis=1)
    width = max(depth, ideal_depth)
    discount = 1.0 / np.log2(np.arange(2, width + 2))

    results: dict[str, dict[str, float]] = {}
    for metric, (name, k) in zip(metrics, parsed):
        top = depth if k is None else min(k, depth)
        hit = relevant[:, :top]
        if name == "ndcg":
            ideal_top = ideal_depth if k is None else min(k, ideal_depth)
            dcg = gains[:, :top] @ discount[:top]
            values = dcg / (ideal[:, :ideal_top] @ discount[:ideal_top])
        elif name == "mrr":
            first = hit.argmax(axis=1)
            values = np.where(hit.any(axis=1), 1.0 / (first + 1), 0.0)
        elif name == "recall":
            values = hit.sum(axis=1) / n_relevant
        else:  # map
            precision_at_rank = np.cumsum(hit, axis=1) / np.arange(1, top + 1)
            values = (precision_at_rank * hit).sum(axis=1) / n_relevant
        results[metric] = dict(zip(qids, values.tolist()))
    return results


def evaluate_run(
    qrels: Qrels, run: Run, metrics: Iterable[str] = ("ndcg@10", "mrr@10", "recall@100", "map")
) -> dict[str, float]:
    """Mean of each metric over the qrels queries that have at least one relevant doc."""
    scores = per_query(qrels, run, metrics)
    if any(not values for values in scores.values()):
        raise ValueError("qrels contain no query with a relevant document; nothing to evaluate")
    return {metric: float(np.mean(list(values.values()))) for metric, values in scores.items()}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
