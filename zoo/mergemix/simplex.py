"""Points on the probability simplex Delta^{K-1}: grids, Dirichlet draws, projection, seed designs.

Every function returns float64 arrays ``[n, K]`` whose rows are >= 0 and sum to 1 (to 1e-12).
"""
from __future__ import annotations

import itertools
from math import comb

import numpy as np


def grid_size(k: int, n: int) -> int:
    """Points of the step-1/n grid over K weights: C(n + K - 1, K - 1)."""
    return comb(n + k - 1, k - 1)


def compositions(total: int, parts: int, minimum: int = 0):
    """Every tuple of ``parts`` integers >= ``minimum`` summing to ``total`` (stars and bars)."""
    free = total - parts * minimum
    if free < 0:
        return
    for bars in itertools.combinations(range(free + parts - 1), parts - 1):
        edges = (-1, *bars, free + parts - 1)
        yield tuple(edges[i + 1] - edges[i] - 1 + minimum for i in range(parts))


def simplex_grid(k: int, n: int, interior: bool = False) -> np.ndarray:
    """The regular grid of step 1/n (``interior``: only points with every weight >= 1/n)."""
    if k < 1 or n < 1:
        raise ValueError(f"simplex grid needs K >= 1 and n >= 1, got K={k}, n={n}")
    points = np.array(list(compositions(n, k, minimum=1 if interior else 0)), dtype=np.float64).reshape(-1, k)
    return points / n


def dirichlet(k: int, count: int, rng: np.random.Generator, concentration: float = 1.0) -> np.ndarray:
    """``count`` draws of Dirichlet(concentration, ..., concentration); 1.0 is uniform on the simplex."""
    points = rng.dirichlet(np.full(k, concentration), size=count)
    return points / points.sum(axis=1, keepdims=True)


def project(vectors: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto the simplex (the sort-based algorithm of Held et al.)."""
    v = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    u = -np.sort(-v, axis=1)
    cumulative = np.cumsum(u, axis=1) - 1
    index = np.arange(1, v.shape[1] + 1)
    active = u - cumulative / index > 0
    rho = active.shape[1] - 1 - np.argmax(active[:, ::-1], axis=1)
    theta = cumulative[np.arange(len(v)), rho] / (rho + 1)
    return np.maximum(v - theta[:, None], 0.0)


def seed_design(k: int, count: int, rng: np.random.Generator, prior: np.ndarray | None = None,
                prior_spread: float = 50.0) -> np.ndarray:
    """MergeMix's seed weights: the K vertices, the pairwise midpoints and the centroid, then Dirichlet(1)
    draws (half of them around ``prior`` when given, Dirichlet(prior_spread * prior)) up to ``count``."""
    fixed = [np.eye(k)]
    if k > 1:
        fixed.append(np.array([(np.eye(k)[i] + np.eye(k)[j]) / 2 for i, j in itertools.combinations(range(k), 2)]))
        fixed.append(np.full((1, k), 1.0 / k))
    points = np.concatenate(fixed)[:count]
    remaining = count - len(points)
    if remaining > 0:
        draws = []
        if prior is not None:
            near = remaining // 2
            alpha = prior_spread * np.clip(project(prior)[0], 1e-3, None)
            draws.append(rng.dirichlet(alpha, size=near))
            remaining -= near
        draws.append(dirichlet(k, remaining, rng))
        points = np.concatenate([points, *draws])
    return points / points.sum(axis=1, keepdims=True)


def candidates(k: int, step: float, dirichlet_samples: int, rng: np.random.Generator) -> np.ndarray:
    """The fine-search candidates: the grid of ``step`` plus ``dirichlet_samples`` Dirichlet(1) draws."""
    n = round(1.0 / step)
    if abs(n * step - 1.0) > 1e-9:
        raise ValueError(f"grid step {step} does not divide 1 (search.grid_step)")
    return np.concatenate([simplex_grid(k, n), dirichlet(k, dirichlet_samples, rng)])
