"""Token-level entropies of a categorical policy over a vocabulary, and the diagnostics around them.

Everything takes logits ``[..., V]`` (any float dtype; computed in float32) and treats ``-inf``
logits (tokens a constrained decoder forbade) as outside the support. The trust-region
entropy (TRE, arXiv 2602.03635) is the entropy of the policy renormalised over its most
plausible tokens, rescaled to the full-vocabulary range ``[0, log|V|]``:

- ``topk``: the ``k`` tokens with the largest logits;
- ``topp``: the smallest prefix of the probability-sorted tokens whose mass reaches ``p`` (the
  crossing token included, the top-1 always), among at most ``max_candidates`` tokens.

Region membership and the scale are constants (a discrete selection): gradients reach only
the logits inside the region, and sum to zero there.
"""
from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import Tensor

TRE_MODES = ("topk", "topp")


def _rows(logits: Tensor) -> Tensor:
    """Logits as float32 ``[T, V]`` (a view where the input already is float32 and contiguous)."""
    return logits.float().reshape(-1, logits.shape[-1])


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is set (plain mean without a mask)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def entropy(logits: Tensor) -> Tensor:
    """Full-vocabulary Shannon entropy per position ``[...]``, differentiable, float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    plogp = torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp))
    return -plogp.sum(-1)


@torch.no_grad()
def trust_region(logits: Tensor, mode: str = "topk", k: int = 2, p: float = 0.99, max_candidates: int = 256,
                 chunk_size: int = 8192) -> tuple[Tensor, Tensor]:
    """The trust region at every position: candidate token ids ``[..., C]`` and which are members ``[..., C]``.

    Candidates are sorted by logit, so member positions form a prefix. Computed without
    gradient, ``chunk_size`` positions at a time (the full softmax of TRE-P stays chunk-sized).
    """
    if mode not in TRE_MODES:
        raise ValueError(f"unknown trust-region mode '{mode}'; choose one of {', '.join(TRE_MODES)}")
    vocab = logits.shape[-1]
    if mode == "topk":
        if not 2 <= k <= vocab:
            raise ValueError(f"TRE-K needs 2 <= k <= |V| = {vocab}, got k={k} (k=1 is no trust region)")
        width = k
    else:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"TRE-P needs 0 < p <= 1, got p={p}")
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        width = min(max_candidates, vocab)
    rows = _rows(logits)
    index = torch.empty(rows.shape[0], width, dtype=torch.long, device=rows.device)
    member = torch.empty(rows.shape[0], width, dtype=torch.bool, device=rows.device)
    for start in range(0, rows.shape[0], chunk_size):
        chunk = rows[start:start + chunk_size]
        top, ids = chunk.topk(width, dim=-1)
        inside = torch.isfinite(top)
        if mode == "topp":
            probs = (top - torch.logsumexp(chunk, dim=-1, keepdim=True)).exp()
            before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(-1)[:, :-1]], dim=-1)
            inside = inside & (before < p)
            inside[:, 0] = torch.isfinite(top[:, 0])            # the top-1 token is always in the region
        index[start:start + chunk_size] = ids
        member[start:start + chunk_size] = inside
    shape = logits.shape[:-1] + (width,)
    return index.view(shape), member.view(shape)


def region_entropy(candidate_logits: Tensor, member: Tensor) -> Tensor:
    """Entropy of the softmax over the member candidates only: ``logsumexp(z_A) - sum_A q z``."""
    z = candidate_logits.float()
    shift = z.masked_fill(~member, float("-inf")).amax(-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    z = torch.where(member, z - shift, torch.zeros_like(z))      # non-members never meet a -inf or a gradient
    logq = torch.log_softmax(z.masked_fill(~member, float("-inf")), dim=-1)
    q = logq.exp()
    return -(q * torch.where(member, logq, torch.zeros_like(logq))).sum(-1)


def trust_region_entropy(logits: Tensor, mask: Tensor | None = None, mode: str = "topk", k: int = 2,
                         p: float = 0.99, max_candidates: int = 256, scale: bool = True,
                         vocab_size: int | None = None, chunk_size: int = 8192,
                         sparse_grad: bool = False) -> tuple[Tensor, Tensor]:
    """TRE per position ``[...]`` and its mean over ``mask``.

    With ``scale`` the region's entropy is multiplied by ``log|V| / log|A_t|`` (``|V|`` is
    ``vocab_size`` or the logits' last dimension); a one-token region gives 0 either way.

    ``sparse_grad``: the gradient to the logits (non-zero only in the region) stays sparse, so
    it adds into the dense gradient the loss already sends to the logits without a second
    ``tokens x V`` tensor. Only for logits that something dense also back-propagates into (a
    sparse gradient cannot pass back through views); a leaf's ``.grad`` would be sparse.
    """
    index, member = trust_region(logits, mode, k, p, max_candidates, chunk_size)
    values = region_entropy(logits.float().gather(-1, index, sparse_grad=sparse_grad), member)
    size = member.sum(-1)
    if scale:
        vocab = vocab_size or logits.shape[-1]
        factor = math.log(vocab) / size.clamp(min=2).float().log()
    else:
        factor = torch.ones_like(values)
    values = values * torch.where(size >= 2, factor, torch.zeros_like(factor))
    if mask is not None:
        values = torch.where(mask.bool(), values, torch.zeros_like(values))
    return values, masked_mean(values, mask)


# -- diagnostics (no gradient) ---------------------------------------------------------------
@torch.no_grad()
def tail_mass(logits: Tensor, k: int = 5) -> Tensor:
    """Probability outside the ``k`` most probable tokens, per position."""
    rows = _rows(logits)
    top = rows.topk(min(k, rows.shape[-1]), dim=-1).values
    inside = (top - torch.logsumexp(rows, dim=-1, keepdim=True)).exp().sum(-1)
    return (1.0 - inside).clamp(min=0.0).view(logits.shape[:-1])


@torch.no_grad()
def top1_probability(logits: Tensor) -> Tensor:
    rows = _rows(logits)
    return (rows.amax(-1) - torch.logsumexp(rows, dim=-1)).exp().view(logits.shape[:-1])


def _valid_mask(valid_ids: Collection[int] | Tensor, vocab: int, device: torch.device) -> Tensor:
    valid = torch.zeros(vocab, dtype=torch.bool, device=device)
    valid[torch.as_tensor(list(valid_ids) if not isinstance(valid_ids, Tensor) else valid_ids,
                          dtype=torch.long, device=device)] = True
    return valid


@torch.no_grad()
def invalid_mass(logits: Tensor, valid_ids: Collection[int] | Tensor) -> Tensor:
    """Probability the policy puts on tokens outside ``valid_ids``, per position."""
    rows = _rows(logits)
    valid = _valid_mask(valid_ids, rows.shape[-1], rows.device)
    probs = torch.softmax(rows, dim=-1)
    return probs[:, ~valid].sum(-1).view(logits.shape[:-1])


@torch.no_grad()
def invalid_token_rate(tokens: Tensor, mask: Tensor, valid_ids: Collection[int] | Tensor, vocab_size: int) -> Tensor:
    """Fraction of the masked (sampled) tokens that are outside ``valid_ids``."""
    valid = _valid_mask(valid_ids, vocab_size, tokens.device)
    return masked_mean((~valid[tokens]).float(), mask)
