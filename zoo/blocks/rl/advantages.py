"""Advantage estimators: small pure functions over tensors, registered by name.

Every estimator takes the outcome rewards ``[N]`` and the response mask ``[N, R]`` (1 on
sampled tokens) and returns ``(advantages, returns)``, both ``[N, R]`` and zero off the mask.
Group estimators also take ``group_ids [N]`` (responses to the same prompt share an id).
"""
from __future__ import annotations

import torch
from torch import Tensor

from zoo.registry import Registry

ADVANTAGES = Registry("advantage estimator")
register_advantage = ADVANTAGES.register
get_advantage = ADVANTAGES.lookup


def group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-element mean, unbiased std (1.0 for single-element groups) and size of its group."""
    _, index = torch.unique(group_ids, return_inverse=True)
    groups = int(index.max()) + 1
    count = torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, index, torch.ones_like(values))
    total = torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    mean = total / count
    centred = values - mean[index]
    sq = torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, index, centred ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.ones_like(sq))
    return mean[index], std[index], count[index]


def broadcast(scores: Tensor, mask: Tensor) -> Tensor:
    """One score per response, copied to each of its sampled tokens."""
    return scores[:, None].to(torch.float32) * mask.to(torch.float32)


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    mask = mask.to(values.dtype)
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    var = (((values - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def outcome_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """The outcome reward placed on each response's last sampled token."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    token_rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    has = last >= 0
    token_rewards[has.nonzero().flatten(), last[has]] = rewards[has].float()
    return token_rewards


@register_advantage("grpo")
def grpo(rewards: Tensor, mask: Tensor, *, group_ids: Tensor, norm: str = "group", eps: float = 1e-6,
         **_: object) -> tuple[Tensor, Tensor]:
    """(r - group mean) / std, with std from the group ("group"), the whole batch ("batch") or 1 ("none")."""
    rewards = rewards.float()
    mean, std, _count = group_stats(rewards, group_ids)
    scores = rewards - mean
    if norm == "group":
        scores = scores / (std + eps)
    elif norm == "batch":
        scores = scores / (rewards.std() + eps if rewards.numel() > 1 else 1.0)
    elif norm != "none":
        raise ValueError(f"grpo norm must be group, batch or none, not '{norm}'")
    advantages = broadcast(scores, mask)
    return advantages, advantages


@register_advantage("dr_grpo")
def dr_grpo(rewards: Tensor, mask: Tensor, *, group_ids: Tensor, **_: object) -> tuple[Tensor, Tensor]:
    """Dr. GRPO: the group-centred reward without std scaling (no difficulty bias)."""
    return grpo(rewards, mask, group_ids=group_ids, norm="none")


@register_advantage("rloo")
def rloo(rewards: Tensor, mask: Tensor, *, group_ids: Tensor, **_: object) -> tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out: r_i minus the mean of the other responses to the same prompt."""
    rewards = rewards.float()
    mean, _std, count = group_stats(rewards, group_ids)
    others = torch.where(count > 1, (mean * count - rewards) / (count - 1).clamp(min=1), torch.zeros_like(mean))
    advantages = broadcast(rewards - others, mask)
    return advantages, advantages


@register_advantage("reinforce_pp")
def reinforce_pp(rewards: Tensor, mask: Tensor, *, group_ids: Tensor | None = None, token_kl: Tensor | None = None,
                 kl_coef: float = 0.0, gamma: float = 1.0, baseline: str = "none", **_: object) -> tuple[Tensor, Tensor]:
    """REINFORCE++: token returns of (outcome - kl_coef * KL), whitened over the whole batch.

    ``baseline="group"`` first subtracts the group mean reward (the "REINFORCE++-baseline" variant).
    """
    rewards = rewards.float()
    if baseline == "group":
        if group_ids is None:
            raise ValueError("reinforce_pp with baseline='group' needs group_ids")
        rewards = rewards - group_stats(rewards, group_ids)[0]
    token_rewards = outcome_token_rewards(rewards, mask)
    if token_kl is not None and kl_coef:
        token_rewards = token_rewards - kl_coef * token_kl * mask
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros(mask.shape[0], device=mask.device)
    for t in reversed(range(mask.shape[1])):
        step = mask[:, t].bool()
        running = torch.where(step, token_rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(step, running, torch.zeros_like(running))
    return masked_whiten(returns, mask), returns


@register_advantage("gae")
def gae(rewards: Tensor, mask: Tensor, *, values: Tensor, token_kl: Tensor | None = None, kl_coef: float = 0.0,
        gamma: float = 1.0, lam: float = 0.95, whiten: bool = True, **_: object) -> tuple[Tensor, Tensor]:
    """PPO's generalised advantage estimation over the sampled tokens (inserted tokens are skipped)."""
    token_rewards = outcome_token_rewards(rewards, mask)
    if token_kl is not None and kl_coef:
        token_rewards = token_rewards - kl_coef * token_kl * mask
    values = values.float() * mask
    advantages = torch.zeros_like(token_rewards)
    next_value = torch.zeros(mask.shape[0], device=mask.device)
    running = torch.zeros_like(next_value)
    for t in reversed(range(mask.shape[1])):
        step = mask[:, t].bool()
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * running
        running = torch.where(step, candidate, running)
        next_value = torch.where(step, values[:, t], next_value)
        advantages[:, t] = torch.where(step, candidate, torch.zeros_like(candidate))
    returns = (advantages + values) * mask
    return (masked_whiten(advantages, mask) if whiten else advantages), returns
