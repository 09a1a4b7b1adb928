"""The Attention Stop (v3: Attention Block) mask: query tokens see only [E] and earlier query tokens."""
from __future__ import annotations

import torch
from torch import Tensor


def build_attention_stop_mask(attention_mask: Tensor, e_pos: Tensor, dtype: torch.dtype = torch.float32,
                              attention_stop: bool = True) -> Tensor:
    """Additive (B, 1, T, T) mask: 0 where row i may attend to column j, the dtype's minimum elsewhere.

    Allowed: causal (j <= i) non-padding keys; with ``attention_stop``, rows after [E]
    (i > e_pos) lose every column before it (j < e_pos). Padding rows attend to themselves so
    no softmax row is empty (an all-minimum row would give NaN in some kernels), and only to
    themselves, so what they compute never depends on the batch's padding.
    """
    batch, length = attention_mask.shape
    device = attention_mask.device
    rows = torch.arange(length, device=device)[:, None]
    cols = torch.arange(length, device=device)[None, :]
    keys = attention_mask.bool()[:, None, :]
    allowed = (cols <= rows)[None] & keys
    if attention_stop:
        e = e_pos.to(device)[:, None, None]
        allowed &= ~((rows[None] > e) & (cols[None] < e))
    padding_rows = ~attention_mask.bool()[:, :, None]
    allowed = torch.where(padding_rows, torch.eye(length, dtype=torch.bool, device=device)[None], allowed)
    mask = torch.zeros(batch, length, length, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def position_ids_from_mask(attention_mask: Tensor, pads_take_positions: bool = False) -> Tensor:
    """First real token at position 0 (left padding shifts nothing); ``pads_take_positions`` is the
    reference code's convention (plain 0..T-1, so left padding consumes positions)."""
    if pads_take_positions:
        return torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)
