"""Collectives that keep autograd intact (gloo included, which lacks reduce_scatter)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size), (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _row_counts(local: Tensor) -> list[int]:
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world()[1])]
    dist.all_gather(counts, count)
    return [int(c.item()) for c in counts]


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; gradients flow back to the rank that owns each row.

    Backward sums every rank's gradient for the whole gathered tensor (each rank's loss
    may depend on every row), then keeps this rank's slice.
    """

    @staticmethod
    def forward(ctx, local: Tensor, counts: list[int], rank: int) -> Tensor:
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        ctx.counts, ctx.rank = counts, rank
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        # A copy: autograd may still hold the incoming buffer, so never reduce it in place.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]], None, None


def gather_with_grad(local: Tensor) -> tuple[Tensor, int]:
    """All ranks' rows concatenated in rank order (sizes may differ), and this rank's offset."""
    rank, size = world()
    if size == 1:
        return local, 0
    counts = _row_counts(local)
    return _GatherWithGrad.apply(local, counts, rank), sum(counts[:rank])


def merge_across_ranks(runs: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """Union of every rank's per-system runs ({system: {qid: {docid: score}}})."""
    if world()[1] == 1:
        return runs
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, runs)
    merged: dict[str, dict[str, dict]] = {}
    for part in parts:
        for system, run in part.items():
            merged.setdefault(system, {}).update(run)
    return merged


def gather_keep_local(local: Tensor) -> Tensor:
    """Every rank's rows in rank order: other ranks' copies without gradient, this rank's with it.

    Ranks may hold different numbers of rows (a short last batch); rows are padded for the
    collective and cut back.
    """
    rank, size = world()
    if size == 1:
        return local
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[:local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    rows = [part[:n] for part, n in zip(parts, counts)]
    rows[rank] = local
    return torch.cat(rows)
