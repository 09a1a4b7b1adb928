"""Clicks for unbiased learning to rank: users and sessions, PBM simulators, IPS relevance
estimators and position-propensity estimation from logs.

Shapes: ``S`` sessions, each showing ``K`` positions of a query's fixed list; ``U`` users;
``Q`` queries. ``theta [U, K]`` is each user's examination probability per position (one row
for a user-oblivious PBM). Estimators work in float64 so their identities hold to 1e-12.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ESTIMATORS",
    "ETA",
    "PBMSimulator",
    "Sessions",
    "UserPBMSimulator",
    "activity",
    "allocate_sessions",
    "click_through_rate",
    "click_weights",
    "estimate_relevance",
    "examination",
    "fit_pbm_em",
    "global_propensity",
    "harvest_propensity",
    "relevance_probability",
    "session_propensity",
]

# Per-user examination decay exponents of the reference simulator: theta_{u,k} = (1/k)^eta_u.
ETA = {
    5: (2.5, 2.0, 1.0, 0.8, 0.0),
    10: (2.5, 2.0, 1.8, 1.5, 1.2, 1.0, 0.8, 0.5, 0.2, 0.0),
    20: (2.5, 2.4, 2.2, 2.0, 1.9, 1.8, 1.6, 1.5, 1.4, 1.2, 1.1, 1.0, 0.9, 0.8, 0.6, 0.5, 0.4, 0.2, 0.1, 0.0),
}
ESTIMATORS = ("naive", "ips_pbm", "straightforward", "user_aware")


def examination(eta: Sequence[float], n_positions: int = 10) -> Tensor:
    """theta [U, K] = (1/k)^eta_u for k = 1..K."""
    k = torch.arange(1, n_positions + 1, dtype=torch.float64)
    return (1.0 / k)[None, :] ** torch.as_tensor(eta, dtype=torch.float64)[:, None]


def activity(n_users: int, decay: float = 1.25) -> Tensor:
    """P(u_i) ∝ decay^(U-1-i): user 0 is the most active."""
    weights = decay ** torch.arange(n_users - 1, -1, -1, dtype=torch.float64)
    return weights / weights.sum()


def global_propensity(theta: Tensor, weights: Tensor) -> Tensor:
    """The user-oblivious propensity θ̄_k = Σ_u w_u θ_{u,k} (weights summing to 1)."""
    return weights.to(theta) @ theta


def relevance_probability(grades: Tensor, epsilon: float = 0.1, mapping: str = "linear",
                          max_grade: int = 4) -> Tensor:
    """γ = ε + (1-ε)·y/y_max (the reference) or ε + (1-ε)(2^y-1)/(2^y_max-1) (ULTRA's usual)."""
    grades = grades.to(torch.float64)
    if mapping == "linear":
        scaled = grades / max_grade
    elif mapping == "exponential":
        scaled = (2.0 ** grades - 1.0) / (2.0 ** max_grade - 1.0)
    else:
        raise ValueError(f"unknown relevance mapping '{mapping}'; choose linear or exponential")
    return epsilon + (1.0 - epsilon) * scaled


@dataclass
class Sessions:
    """One row per session: the query it issued and the user who issued it."""

    query: Tensor        # [S] long
    user: Tensor         # [S] long
    preference: Tensor   # [U, Q] each user's query distribution

    def __len__(self) -> int:
        return int(self.query.numel())


def allocate_sessions(n_sessions: int, n_queries: int, n_users: int, seed: int = 1,
                      preference_fraction: float = 0.5, activity_decay: float = 1.25) -> Sessions:
    """The reference allocator: session counts per user ~ Multinomial(S, activity); each user prefers
    a random ``preference_fraction`` of the queries with Uniform(0, 1) weights, and spreads its
    sessions over them by a multinomial draw. Users therefore differ in the queries they issue."""
    rng = np.random.default_rng(seed)
    per_user = rng.multinomial(n_sessions, activity(n_users, activity_decay).numpy())
    n_preferred = max(1, int(preference_fraction * n_queries))
    preference = np.zeros((n_users, n_queries))
    queries, users = [], []
    for u in range(n_users):
        chosen = rng.choice(n_queries, size=n_preferred, replace=False)
        weights = rng.uniform(size=n_preferred)
        preference[u, chosen] = weights / weights.sum()
        counts = rng.multinomial(per_user[u], preference[u])
        queries.append(np.repeat(np.arange(n_queries), counts))
        users.append(np.full(per_user[u], u))
    order = rng.permutation(n_sessions)
    return Sessions(query=torch.from_numpy(np.concatenate(queries)[order]),
                    user=torch.from_numpy(np.concatenate(users)[order]),
                    preference=torch.from_numpy(preference))


class UserPBMSimulator:
    """User-aware position-based model: P(click at k | u) = θ_{u,k} · γ_{q, d_k}, independently per position."""

    def __init__(self, theta: Tensor) -> None:
        if theta.dim() != 2:
            raise ValueError(f"theta must be [users, positions], got shape {tuple(theta.shape)}")
        self.theta = theta.to(torch.float64)

    @classmethod
    def from_eta(cls, eta: Sequence[float], n_positions: int = 10) -> UserPBMSimulator:
        return cls(examination(eta, n_positions))

    def click_probability(self, gamma: Tensor, user: Tensor) -> Tensor:
        return self.theta[user] * gamma.to(torch.float64)

    def simulate(self, gamma: Tensor, user: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Clicks [S, K] (bool) for sessions shown relevance ``gamma [S, K]`` by ``user [S]``."""
        return torch.bernoulli(self.click_probability(gamma, user), generator=generator).bool()


class PBMSimulator(UserPBMSimulator):
    """The user-oblivious PBM: one examination curve θ_k for everyone."""

    def __init__(self, theta: Tensor) -> None:
        super().__init__(theta.reshape(1, -1))

    def simulate(self, gamma: Tensor, user: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        return super().simulate(gamma, torch.zeros(gamma.shape[0], dtype=torch.long), generator)


def _per_query_mean(values: Tensor, query: Tensor, n_queries: int) -> tuple[Tensor, Tensor]:
    """Mean of ``values [S, K]`` over each query's sessions, and the session counts n_q."""
    counts = torch.bincount(query, minlength=n_queries).to(values.dtype)
    sums = values.new_zeros(n_queries, values.shape[1]).index_add_(0, query, values)
    return sums / counts.clamp_min(1)[:, None], counts


def session_propensity(method: str, query: Tensor, user: Tensor, theta: Tensor, n_queries: int,
                       smoothing: float = 0.0) -> Tensor:
    """The propensity each estimator divides session s's click at position k by, [S, K].

    naive: 1. ips_pbm: θ̄_k = Σ_u (n_u/n) θ_{u,k} (session-weighted, user-oblivious).
    straightforward: θ_{u_s,k}. user_aware: θ̂_{q_s,k} = Σ_u P̂(u|q_s) θ_{u,k}, the mean of θ_{u,k}
    over q's sessions; ``smoothing`` κ > 0 shrinks P̂(u|q) toward the global P̂(u) with κ
    pseudo-sessions (κ = 0 is the reference).
    """
    theta = theta.to(torch.float64)
    per_session = theta[user]
    if method == "naive":
        return torch.ones_like(per_session)
    overall = per_session.mean(0)
    if method == "ips_pbm":
        return overall.expand_as(per_session)
    if method == "straightforward":
        return per_session
    if method == "user_aware":
        counts = torch.bincount(query, minlength=n_queries).to(theta.dtype)
        sums = theta.new_zeros(n_queries, theta.shape[1]).index_add_(0, query, per_session)
        per_query = (sums + smoothing * overall) / (counts + smoothing).clamp_min(1e-300)[:, None]
        return per_query[query]
    raise ValueError(f"unknown estimator '{method}'; choose one of {', '.join(ESTIMATORS)}")


def click_weights(clicks: Tensor, query: Tensor, user: Tensor, theta: Tensor, n_queries: int, method: str,
                  smoothing: float = 0.0) -> Tensor:
    """Per-click IPS weights w_{s,k} = c_{s,k} / (n_q θ_{s,k}): summed over a query's sessions they give
    its estimated labels, so a loss linear in the labels can be trained session by session."""
    propensity = session_propensity(method, query, user, theta, n_queries, smoothing)
    counts = torch.bincount(query, minlength=n_queries).to(torch.float64)
    return clicks.to(torch.float64) / (counts[query][:, None] * propensity)


def estimate_relevance(clicks: Tensor, query: Tensor, user: Tensor, theta: Tensor, n_queries: int,
                       method: str = "user_aware", smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Estimated γ̂ [Q, K] per query and position, and n_q [Q]; queries without sessions get 0."""
    weights = click_weights(clicks, query, user, theta, n_queries, method, smoothing)
    labels = weights.new_zeros(n_queries, weights.shape[1]).index_add_(0, query, weights)
    return labels, torch.bincount(query, minlength=n_queries)


def click_through_rate(clicks: Tensor) -> Tensor:
    """Share of impressions at each position that were clicked, [K]."""
    return clicks.to(torch.float64).mean(0)


def _exposure_tables(items: Tensor, clicks: Tensor, n_items: int) -> tuple[Tensor, Tensor]:
    """Impressions and clicks per (item, position), each [n_items, K]."""
    n_positions = items.shape[1]
    flat = (items * n_positions + torch.arange(n_positions)).reshape(-1)
    size = n_items * n_positions
    shown = torch.bincount(flat, minlength=size).reshape(n_items, n_positions).to(torch.float64)
    clicked = torch.bincount(flat, weights=clicks.reshape(-1).to(torch.float64),
                             minlength=size).reshape(n_items, n_positions)
    return shown, clicked


def fit_pbm_em(items: Tensor, clicks: Tensor, n_items: int, group: Tensor | None = None, n_groups: int = 1,
               n_iter: int = 200, tol: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Fit a PBM by expectation-maximisation: θ [G, K] per group (one group = the user-oblivious
    PBM; users as groups = per-user propensities) and γ [n_items] shared by all groups.

    ``items [S, K]`` indexes the (query, document) shown at each position. PBM is identified only
    when items appear at several positions (lists that vary across sessions); θ and γ trade a common
    scale, so compare θ_k / θ_1. E-step posteriors for an unclicked impression:
    P(E=1 | c=0) = θ(1-γ)/(1-θγ), P(R=1 | c=0) = (1-θ)γ/(1-θγ); clicked ones are examined and relevant.
    """
    n_positions = items.shape[1]
    group = torch.zeros(items.shape[0], dtype=torch.long) if group is None else group
    clicked = clicks.to(torch.float64)
    positions = torch.arange(n_positions).expand_as(items)
    cell = (group[:, None] * n_positions + positions).reshape(-1)
    per_cell = torch.bincount(cell, minlength=n_groups * n_positions).to(torch.float64)
    per_item = torch.bincount(items.reshape(-1), minlength=n_items).to(torch.float64)
    theta = torch.full((n_groups, n_positions), 0.5, dtype=torch.float64)
    gamma = torch.full((n_items,), 0.5, dtype=torch.float64)
    for _ in range(n_iter):
        t, g = theta[group], gamma[items]
        unclicked = (1.0 - t * g).clamp_min(1e-12)
        examined = clicked + (1 - clicked) * t * (1 - g) / unclicked
        relevant = clicked + (1 - clicked) * (1 - t) * g / unclicked
        new_theta = (torch.bincount(cell, weights=examined.reshape(-1), minlength=n_groups * n_positions)
                     / per_cell.clamp_min(1)).reshape(n_groups, n_positions)
        new_gamma = torch.bincount(items.reshape(-1), weights=relevant.reshape(-1), minlength=n_items) \
            / per_item.clamp_min(1)
        change = max((new_theta - theta).abs().max().item(), (new_gamma - gamma).abs().max().item())
        theta, gamma = new_theta, new_gamma
        if change < tol:
            break
    return theta, gamma


def harvest_propensity(items: Tensor, clicks: Tensor, n_items: int, reference: int = 0) -> Tensor:
    """Relative propensities θ_k / θ_ref from documents shown at both positions k and ref
    (intervention harvesting from a logger whose lists vary).

    For each position k, every item shown at both k and ref gets weight n_k n_ref / (n_k + n_ref);
    the ratio of weighted click rates at k and at ref estimates θ_k / θ_ref, because an item's
    relevance cancels between the two positions.
    """
    shown, clicked = _exposure_tables(items, clicks, n_items)
    ctr = clicked / shown.clamp_min(1)
    both = (shown > 0) & (shown[:, reference:reference + 1] > 0)
    weight = torch.where(both, shown * shown[:, reference:reference + 1]
                         / (shown + shown[:, reference:reference + 1]).clamp_min(1), torch.zeros_like(shown))
    at_k = (weight * ctr).sum(0)
    at_ref = (weight * ctr[:, reference:reference + 1]).sum(0)
    return at_k / at_ref.clamp_min(1e-300)
