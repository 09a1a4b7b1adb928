"""Policy losses, KL estimators and loss aggregation: pure functions over per-token tensors."""
from __future__ import annotations

import torch
from torch import Tensor

from zoo.registry import Registry

POLICY_LOSSES = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.lookup
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_sum_const_norm")


def aggregate(values: Tensor, mask: Tensor, mode: str = "token_mean", max_length: int | None = None) -> Tensor:
    """Reduce per-token values [N, R] over the mask.

    - ``token_mean``: mean over every masked token of the batch (long responses weigh more).
    - ``seq_mean_token_mean``: mean per response, then over responses (GRPO's original form).
    - ``seq_mean_token_sum``: sum per response, then mean over responses.
    - ``seq_sum_const_norm``: sum over all tokens divided by the constant ``max_length``
      (Dr. GRPO; the gradient scale does not depend on response lengths).
    """
    mask = mask.to(values.dtype)
    masked = values * mask
    if mode == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1)
    per_seq_tokens = mask.sum(-1)
    present = per_seq_tokens > 0
    if mode == "seq_mean_token_mean":
        per_seq = masked.sum(-1) / per_seq_tokens.clamp(min=1)
        return per_seq[present].sum() / present.sum().clamp(min=1)
    if mode == "seq_mean_token_sum":
        return masked.sum(-1)[present].sum() / present.sum().clamp(min=1)
    if mode == "seq_sum_const_norm":
        if not max_length:
            raise ValueError("seq_sum_const_norm needs max_length (the constant normaliser)")
        return masked.sum() / max_length
    raise ValueError(f"unknown aggregation '{mode}'; choose one of {', '.join(AGGREGATIONS)}")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman's k1/k2/k3)."""
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "abs":
        return (logprobs - ref_logprobs).abs()
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if kind == "k3":
        delta = (ref_logprobs - logprobs).clamp(-20, 20)
        return (delta.exp() - delta - 1).clamp(-10, 10)
    raise ValueError(f"unknown KL estimator '{kind}'; choose k1, k2, k3 or abs")


@register_policy_loss("clipped")
def clipped(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
            clip_high: float | None = None, dual_clip: float | None = None, agg: str = "token_mean",
            max_length: int | None = None, **_: object) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, -min(rho A, clip(rho, 1-low, 1+high) A); optional dual clip.

    The dual clip bounds the loss of a negative-advantage token at -c*A when rho grows large.
    """
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = (logprobs - old_logprobs).clamp(-20, 20)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped_loss)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    m = mask.to(loss.dtype)
    count = m.sum().clamp(min=1)
    log_ratio, ratio = log_ratio.detach(), ratio.detach()
    stats = {
        "clip_fraction": ((clipped_loss > unclipped).detach().to(loss.dtype) * m).sum() / count,
        "approx_kl": (-log_ratio * m).sum() / count,
        "ratio": (ratio * m).sum() / count,
    }
    return aggregate(loss, mask, agg, max_length), stats


@register_policy_loss("dual_clip")
def dual_clipped(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 dual_clip: float | None = 3.0, **kwargs: object) -> tuple[Tensor, dict[str, Tensor]]:
    return clipped(logprobs, old_logprobs, advantages, mask, dual_clip=3.0 if dual_clip is None else dual_clip,
                   **kwargs)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2,
               agg: str = "token_mean") -> Tensor:
    """PPO's clipped value loss, 0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2)."""
    loss = (values - returns) ** 2
    if clip is not None:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped_values - returns) ** 2)
    return 0.5 * aggregate(loss, mask, agg)
