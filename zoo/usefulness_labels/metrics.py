"""Agreement between predicted and user usefulness labels: accuracy, Cohen's kappa (unweighted and
quadratic-weighted), Pearson, Spearman, MAE and per-level F1.

Undefined correlations (a constant label vector) are reported as 0.0, not NaN, so a judge that gives
every document one label scores as "no agreement beyond chance" in every column.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats


def confusion(pred: Sequence[int], gold: Sequence[int], levels: Sequence[int]) -> np.ndarray:
    """[L, L] counts, rows = gold level, columns = predicted level."""
    index = {level: i for i, level in enumerate(levels)}
    unknown = sorted({v for v in list(pred) + list(gold) if v not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not in the level set {list(levels)}")
    out = np.zeros((len(levels), len(levels)))
    for p, g in zip(pred, gold):
        out[index[g], index[p]] += 1
    return out


def cohen_kappa(pred: Sequence[int], gold: Sequence[int], levels: Sequence[int], weights: str | None = None) -> float:
    """kappa = 1 - sum(w O) / sum(w E); w_ab = 1[a != b] (None), |a-b| (linear) or (a-b)^2 (quadratic)."""
    observed = confusion(pred, gold, levels)
    total = observed.sum()
    if total == 0:
        raise ValueError("kappa of an empty label vector")
    expected = np.outer(observed.sum(1), observed.sum(0)) / total
    a, b = np.meshgrid(np.arange(len(levels)), np.arange(len(levels)), indexing="ij")
    if weights is None:
        w = (a != b).astype(float)
    elif weights == "linear":
        w = np.abs(a - b).astype(float)
    elif weights == "quadratic":
        w = ((a - b) ** 2).astype(float)
    else:
        raise ValueError(f"unknown kappa weights '{weights}'; choose None, linear or quadratic")
    disagreement = (w * expected).sum()
    if disagreement == 0:   # both vectors constant: agreement is total or undefined
        return 1.0 if (w * observed).sum() == 0 else 0.0
    return float(1.0 - (w * observed).sum() / disagreement)


def _correlation(fn, x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(x, y)[0])


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    return _correlation(stats.pearsonr, x, y)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return _correlation(stats.spearmanr, x, y)


def agreement(pred: Sequence[int], gold: Sequence[int], levels: Sequence[int]) -> dict[str, float]:
    """Every agreement metric of the spec, plus F1 per level (``f1_level{k}``)."""
    pred, gold = [int(p) for p in pred], [int(g) for g in gold]
    p, g = np.asarray(pred, dtype=float), np.asarray(gold, dtype=float)
    out = {"accuracy": float((p == g).mean()), "kappa": cohen_kappa(pred, gold, levels),
           "weighted_kappa": cohen_kappa(pred, gold, levels, "quadratic"), "pearson": pearson(p, g),
           "spearman": spearman(p, g), "mae": float(np.abs(p - g).mean())}
    for level in levels:
        tp = float(((p == level) & (g == level)).sum())
        denominator = float((p == level).sum() + (g == level).sum())
        out[f"f1_level{level}"] = 2 * tp / denominator if denominator else 0.0
    return out
