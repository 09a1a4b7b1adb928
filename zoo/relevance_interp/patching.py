"""Activation patching for yes/no judgments: metrics, normalisation and batched patch sweeps.

A sweep patches clean activations into the corrupted run, one (layer, position group[, head])
variant per batch row, so one forward serves many variants. Rows are sorted by layer and each
chunk starts at its lowest layer from the corrupted run's cached residual stream: nothing below a
patched layer can change.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from zoo.blocks.llm import HEAD_SITES, ActivationHooks, Patch

NORMALISATIONS = ("dataset_mean", "per_sample")


def answer_token_ids(tokenizer, answers: Sequence[str]) -> list[int]:
    """The single token of each answer word; fails loudly when one splits (spec, ambiguity 4)."""
    ids = []
    for word in answers:
        if not isinstance(word, str):
            raise TypeError(f"answer {word!r} is not a string (quote yes/no in YAML configs)")
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
            raise ValueError(f"answer '{word}' is not one known token of this tokenizer (got {pieces})")
        ids.append(pieces[0])
    return ids


def logit_diff(logits: Tensor, yes: int, no: int) -> Tensor:
    """LD = logit(yes) - logit(no) at the last position, per row."""
    last = logits[:, -1].float()
    return last[:, yes] - last[:, no]


def prob_diff(logits: Tensor, yes: int, no: int) -> Tensor:
    probs = torch.softmax(logits[:, -1].float(), dim=-1)
    return probs[:, yes] - probs[:, no]


def normalised_effect(patched: Tensor, clean: Tensor, corrupt: Tensor) -> Tensor:
    """Mean over samples of (LD_patched,i - mean LD_corr) / (mean LD_clean - mean LD_corr).

    ``patched`` is [N, ...] and ``clean``/``corrupt`` are [N]; 1 = fully restored, 0 = nothing; a
    zero denominator gives 0."""
    denom = clean.mean() - corrupt.mean()
    if denom == 0:
        return torch.zeros(patched.shape[1:])
    return ((patched - corrupt.mean()) / denom).mean(0)


def per_sample_effect(patched: Tensor, clean: Tensor, corrupt: Tensor) -> Tensor:
    """Mean over samples of (LD_patched,i - LD_corr,i) / (LD_clean,i - LD_corr,i); NaN -> 0."""
    shape = (-1,) + (1,) * (patched.dim() - 1)
    effect = (patched - corrupt.view(shape)) / (clean - corrupt).view(shape)
    return torch.nan_to_num(effect, nan=0.0, posinf=0.0, neginf=0.0).mean(0)


def indirect_effect(patched: Tensor, corrupt: Tensor) -> Tensor:
    """Unnormalised IE_i = LD_patched,i - LD_corr,i, averaged over samples."""
    return (patched - corrupt.view((-1,) + (1,) * (patched.dim() - 1))).mean(0)


def kv_head(head: int, heads: int, kv_heads: int) -> int:
    """The key/value head a query head reads under grouped-query attention."""
    return head // (heads // kv_heads)


def variants(site: str, layers: int, groups: int, heads: int) -> list[tuple[int, int, int | None]]:
    """(layer, group, head) of every patch in a sweep, layer-major (head None for whole-layer sites)."""
    if site in HEAD_SITES:
        return [(layer, g, h) for layer in range(layers) for h in range(heads) for g in range(groups)]
    return [(layer, g, None) for layer in range(layers) for g in range(groups)]


@torch.no_grad()
def patch_sweep(hooks: ActivationHooks, corrupt_ids: Tensor, site: str, clean_acts: Sequence[Tensor],
                corrupt_resid_pre: Sequence[Tensor] | None, group_masks: Tensor, answer_ids: tuple[int, int],
                batch_size: int = 32) -> Tensor:
    """LD of the corrupted prompt [1, T] with the clean ``site`` activation patched in at every
    (layer, position group[, head]); [L, G] or, for per-head sites, [L, H, G].

    ``clean_acts[l]`` is the clean run's activation of layer l ([1, T, ...]); with
    ``corrupt_resid_pre`` (the corrupted run's resid_pre per layer) each chunk skips the layers
    below its first patch."""
    L, G = len(clean_acts), group_masks.shape[0]
    per_head = site in HEAD_SITES
    todo = variants(site, L, G, hooks.heads)
    out = torch.empty(len(todo))
    device = corrupt_ids.device
    masks = group_masks.to(device)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        R, T = len(chunk), corrupt_ids.shape[1]
        patches = []
        for layer in sorted({v[0] for v in chunk}):
            shape = (R, T, hooks.heads) if per_head else (R, T)
            mask = torch.zeros(shape, dtype=torch.bool, device=device)
            for r, (lay, g, h) in enumerate(chunk):
                if lay == layer:
                    if per_head:
                        mask[r, :, h] = masks[g]
                    else:
                        mask[r] = masks[g]
            value = clean_acts[layer].expand(R, *clean_acts[layer].shape[1:])
            patches.append(Patch(site, layer, value, mask))
        first = chunk[0][0]
        ids = corrupt_ids.expand(R, -1)
        attention = torch.ones_like(ids)
        if corrupt_resid_pre is not None and first > 0:
            resid = corrupt_resid_pre[first].expand(R, -1, -1)
            logits, _ = hooks.run(ids, attention, patches=patches, start_layer=first, start_resid=resid)
        else:
            logits, _ = hooks.run(ids, attention, patches=patches)
        out[start:start + R] = logit_diff(logits, *answer_ids).cpu()
    return out.view(L, hooks.heads, G) if per_head else out.view(L, G)


@torch.no_grad()
def mean_activations(hooks: ActivationHooks, prompts: Tensor, sites: Sequence[tuple[str, int]]
                     ) -> dict[tuple[str, int], Tensor]:
    """Position-wise dataset means [1, T, ...] of ``sites`` over fixed-length prompts [N, T]."""
    _, cache = hooks.run(prompts, torch.ones_like(prompts), capture=list(sites))
    return {key: value.mean(0, keepdim=True) for key, value in cache.items()}


def ablation_patches(means: dict[tuple[str, int], Tensor], rows: int, keep: dict[tuple[str, int], Tensor] | None = None
                     ) -> list[Patch]:
    """Mean-ablate every cached site; ``keep[(site, layer)]`` is a mask ([T] or [T, H] for per-head
    sites) of what stays intact (a circuit's heads at their position group)."""
    patches = []
    for (site, layer), mean in means.items():
        mask = torch.ones(mean.shape[1:-1], dtype=torch.bool)
        if keep and (site, layer) in keep:
            mask &= ~keep[(site, layer)]
        patches.append(Patch(site, layer, mean.expand(rows, *mean.shape[1:]), mask.expand(rows, *mask.shape)))
    return patches
