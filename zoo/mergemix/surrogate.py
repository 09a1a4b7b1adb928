"""Performance surfaces f_m(alpha) fitted on the seed merges, the utility U, and rank statistics.

Surrogates (``SURROGATES``, chosen by ``search.surrogate``): ``quadratic_ridge`` (degree-2 polynomial
ridge, the default at small N) and ``lightgbm`` (the paper's; needs the lightgbm package). Each is a
class with ``fit(alphas [N, K], y [N])`` and ``predict(alphas) -> [n]``.

Utility: scores ``[n, M]`` are normalised per capability against the seed evaluations
(``minmax`` by default; ``zscore``; ``raw``) and averaged over capabilities (or weighted, for a
capability-targeted utility).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from zoo.registry import Registry

SURROGATES = Registry("surrogate")
NORMALISATIONS = ("minmax", "zscore", "raw")


def quadratic_features(alphas: np.ndarray) -> np.ndarray:
    """[1, a_i, a_i a_j (i <= j)] for each row."""
    a = np.atleast_2d(np.asarray(alphas, dtype=np.float64))
    pairs = [a[:, i] * a[:, j] for i, j in itertools.combinations_with_replacement(range(a.shape[1]), 2)]
    return np.column_stack([np.ones(len(a)), a, *pairs])


@SURROGATES.register("quadratic_ridge")
class QuadraticRidge:
    """Least squares on quadratic features with an L2 penalty ``ridge`` on every non-constant weight."""

    def __init__(self, ridge: float = 1e-3) -> None:
        self.ridge = ridge
        self.coef: np.ndarray | None = None

    def fit(self, alphas: np.ndarray, y: np.ndarray) -> QuadraticRidge:
        x = quadratic_features(alphas)
        penalty = np.sqrt(self.ridge) * np.eye(x.shape[1])[1:]
        design = np.vstack([x, penalty])
        target = np.concatenate([np.asarray(y, dtype=np.float64), np.zeros(len(penalty))])
        self.coef = np.linalg.lstsq(design, target, rcond=None)[0]
        return self

    def predict(self, alphas: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("QuadraticRidge.predict before fit")
        return quadratic_features(alphas) @ self.coef


@SURROGATES.register("lightgbm")
class LightGBMSurrogate:
    """The paper's regressor; the spec's settings for N ~ 40 (``min_child_samples=2, num_leaves=4`` at N ~ 15)."""

    def __init__(self, n_estimators: int = 200, learning_rate: float = 0.05, num_leaves: int = 7,
                 min_child_samples: int = 3, seed: int = 0) -> None:
        try:
            import lightgbm
        except ImportError as err:
            raise ImportError("search.surrogate=lightgbm needs the lightgbm package (pip install lightgbm); "
                              "quadratic_ridge needs nothing") from err
        self.model = lightgbm.LGBMRegressor(n_estimators=n_estimators, learning_rate=learning_rate,
                                            num_leaves=num_leaves, min_child_samples=min_child_samples,
                                            subsample=1.0, random_state=seed, verbose=-1)

    def fit(self, alphas: np.ndarray, y: np.ndarray) -> LightGBMSurrogate:
        self.model.fit(np.asarray(alphas), np.asarray(y))
        return self

    def predict(self, alphas: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(np.atleast_2d(alphas)), dtype=np.float64)


def build_surrogate(name: str, **options):
    return SURROGATES.lookup(name)(**options)


def leave_one_out_error(name: str, alphas: np.ndarray, y: np.ndarray, **options) -> float:
    """Root-mean-square error of predicting each seed from a surrogate fitted on the others."""
    errors = []
    for i in range(len(alphas)):
        keep = np.arange(len(alphas)) != i
        model = build_surrogate(name, **options).fit(alphas[keep], y[keep])
        errors.append(float(model.predict(alphas[i:i + 1])[0] - y[i]))
    return float(np.sqrt(np.mean(np.square(errors))))


class Normaliser:
    """Per-capability affine map fitted on reference scores ``[N, M]`` (the seed evaluations)."""

    def __init__(self, reference: np.ndarray, kind: str = "minmax") -> None:
        if kind not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation '{kind}'; choose one of {', '.join(NORMALISATIONS)}")
        reference = np.atleast_2d(np.asarray(reference, dtype=np.float64))
        if kind == "minmax":
            self.shift, scale = reference.min(0), reference.max(0) - reference.min(0)
        elif kind == "zscore":
            self.shift, scale = reference.mean(0), reference.std(0)
        else:
            self.shift, scale = np.zeros(reference.shape[1]), np.ones(reference.shape[1])
        self.scale = np.where(scale > 1e-12, scale, 1.0)     # a constant capability contributes 0, not NaN

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(scores) - self.shift) / self.scale


def utility(scores: np.ndarray, normaliser: Normaliser, weights: Sequence[float] | None = None) -> np.ndarray:
    """U per row: the (weighted) mean of the normalised capability scores."""
    normalised = normaliser(scores)
    w = np.ones(normalised.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    return normalised @ (w / w.sum())


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of average ranks (ties share their mean rank)."""
    rx, ry = rankdata(x), rankdata(y)
    if len(rx) != len(ry) or len(rx) < 2:
        raise ValueError(f"spearman needs two sequences of equal length >= 2, got {len(rx)} and {len(ry)}")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx @ rx) * (ry @ ry))
    return float(rx @ ry / denominator) if denominator > 0 else float("nan")
