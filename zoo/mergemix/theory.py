"""Why merging experts predicts mixture training, and what MergeMix costs (the paper's Section 3 and Table 6).

With plain gradient descent from a shared theta_0, an expert on domain k moves by
-eta sum_t g_k(theta_k^t); the lambda-mixture moves by -eta sum_t sum_k lambda_k g_k(theta^t). For constant
gradients (linear losses) the lambda-merge of the experts equals the mixture model exactly; otherwise
they differ at second order: to O(eta^3),
    theta_mix - theta_merge = eta^2 T(T-1)/2 (Hbar gbar - sum_k lambda_k H_k g_k),
with g_k, H_k the gradient and Hessian of domain k at theta_0 and bars the lambda-averages.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Gradient = Callable[[np.ndarray], np.ndarray]


def gradient_descent(theta0: np.ndarray, gradient: Gradient, lr: float, steps: int) -> np.ndarray:
    theta = np.array(theta0, dtype=np.float64)
    for _ in range(steps):
        theta = theta - lr * gradient(theta)
    return theta


def mixture_gradient(gradients: Sequence[Gradient], ratios: Sequence[float]) -> Gradient:
    """The gradient of sum_k lambda_k L_k (training on the lambda-mixture, in expectation)."""
    return lambda theta: sum(r * g(theta) for r, g in zip(ratios, gradients))


def second_order_gap(gradients0: Sequence[np.ndarray], hessians: Sequence[np.ndarray], ratios: Sequence[float],
                     lr: float, steps: int) -> np.ndarray:
    """eta^2 T(T-1)/2 (Hbar gbar - sum_k lambda_k H_k g_k): the leading term of theta_mix - theta_merge."""
    g_bar = sum(r * g for r, g in zip(ratios, gradients0))
    h_bar = sum(r * h for r, h in zip(ratios, hessians))
    own = sum(r * h @ g for r, h, g in zip(ratios, hessians, gradients0))
    return lr ** 2 * steps * (steps - 1) / 2 * (h_bar @ g_bar - own)


def equivalent_cost(model_billions: float, tokens_billions: float, runs: int) -> float:
    """Table 6's cost unit: model size (B params) x training tokens (B) x runs."""
    return model_billions * tokens_billions * runs


def relative_search_cost(num_domains: int, expert_tokens: float, trial_runs: int, trial_tokens: float) -> float:
    """How many MergeMix searches (K experts of D_expert tokens) one search of N full trial runs pays for."""
    return trial_runs * trial_tokens / (num_domains * expert_tokens)
