"""Modular gradient surgery (MGS, arXiv 2602.02301): PCGrad applied separately inside each module.

Given one gradient per domain, ``g_d^m`` for every module ``m`` of a parameter partition, each
domain's gradient is projected, module by module, off the *original* gradients of the other
domains it conflicts with (visited in a random order), and the projected gradients are summed:

    h <- g_i^m;  for j in sigma_i: if <h, g_j^m> < 0 and ||g_j^m||^2 > 1e-12: h <- h - <h,g_j^m>/||g_j^m||^2 g_j^m
    G^m = sum_i h_i^m

Every ``h`` is a linear combination of the original ``g_l^m``, so the procedure runs on the
module's ``D x D`` Gram matrix and only the final combination touches the gradients: one pass
over the parameters for the Grams, one to write ``G``. The same coefficients come out of Grams
summed over shards (FSDP) or over parameter tensors (coarser partitions), so this is exact for
any partition. ``partition="global"`` is plain PCGrad on the flattened vector; ``project=False``
is plain mixing (the sum), with the same diagnostics.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

GRANULARITIES = ("param", "module", "block", "layer", "global")
CONFLICT_EPS = 1e-12        # skip projecting onto a gradient with ||g_j||^2 at or below this
COSINE_EPS = 1e-8           # cosines are 0 where either norm is below this


def partition_parameters(names: Sequence[str], granularity: str = "param",
                         exclude: Sequence[str] = ()) -> dict[str, str | None]:
    """Module key of every parameter name; ``None`` for names matching an ``exclude`` regex (never projected).

    - ``param``: each tensor is its own module (the reference);
    - ``module``: the owning ``nn.Module`` (``layers.3.self_attn.q_proj``);
    - ``block``: the sub-block of a numbered layer (``layers.3.self_attn`` vs ``layers.3.mlp``);
    - ``layer``: the numbered layer (``layers.3``);
    - ``global``: one module holding everything (PCGrad).

    Parameters outside numbered layers (embeddings, final norm, LM head) fall back to their
    owning module for ``block`` and ``layer``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown MGS partition '{granularity}'; choose one of {', '.join(GRANULARITIES)}")
    patterns = [re.compile(p) for p in exclude]
    out: dict[str, str | None] = {}
    for name in names:
        if any(p.search(name) for p in patterns):
            out[name] = None
            continue
        parts = name.split(".")
        owner = ".".join(parts[:-1]) or name
        layer = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        if granularity == "param":
            out[name] = name
        elif granularity == "global":
            out[name] = "all"
        elif granularity == "module" or layer is None:
            out[name] = owner
        elif granularity == "layer":
            out[name] = ".".join(parts[:layer + 1])
        else:
            out[name] = ".".join(parts[:layer + 2]) if layer + 2 < len(parts) else owner
    return out


def projection_orders(modules: int, domains: int, generator: torch.Generator | None = None) -> Tensor:
    """``[M, D, D-1]``: the other domains each domain visits, in a random order per module and domain."""
    keys = torch.rand(modules, domains, domains, generator=generator)
    keys.diagonal(dim1=1, dim2=2).fill_(2.0)                  # a domain never visits itself: sort it last
    return keys.argsort(dim=-1)[..., :domains - 1]


def pcgrad_coefficients(gram: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sequential PCGrad on Gram matrices ``[M, D, D]`` (float64 advised).

    Returns ``coef [M, D, D]`` with ``h_i^m = sum_l coef[m, i, l] g_l^m`` and the number of
    projections made in each module ``[M]``. Orders come from ``projection_orders`` with
    ``generator`` (seed it identically on all ranks: for D >= 3 the order matters).
    """
    modules, domains, _ = gram.shape
    coef = torch.eye(domains, dtype=gram.dtype, device=gram.device).expand(modules, -1, -1).clone()
    projections = torch.zeros(modules, dtype=torch.long, device=gram.device)
    if domains < 2:
        return coef, projections
    orders = projection_orders(modules, domains, generator).to(gram.device)
    norms = gram.diagonal(dim1=1, dim2=2)                      # [M, D]
    for step in range(domains - 1):
        j = orders[..., step]                                  # [M, D]: whom each domain visits now
        target = gram.gather(2, j[:, None, :].expand(-1, domains, -1)).transpose(1, 2)   # [m, i, l] = <g_l, g_j(m,i)>
        inner = (coef * target).sum(-1)                        # <h_i, g_j>
        norm_j = norms.gather(1, j)
        conflict = (inner < 0) & (norm_j > CONFLICT_EPS)
        step_size = torch.where(conflict, inner / norm_j.clamp(min=CONFLICT_EPS), torch.zeros_like(inner))
        coef.scatter_add_(2, j[..., None], -step_size[..., None])
        projections += conflict.sum(-1)
    return coef, projections


def cosines(gram: Tensor) -> Tensor:
    """Pairwise cosines ``[M, D, D]`` from Gram matrices; 0 where a norm is below ``COSINE_EPS``."""
    norms = gram.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
    denom = norms[:, :, None] * norms[:, None, :]
    valid = (norms[:, :, None] >= COSINE_EPS) & (norms[:, None, :] >= COSINE_EPS)
    return torch.where(valid, gram / denom.clamp(min=COSINE_EPS ** 2), torch.zeros_like(gram))


@dataclass
class SurgeryStats:
    modules: list[str]          # module keys, in the order of the tensors below
    gram: Tensor                # [M, D, D] float64 Gram matrices of the original domain gradients
    projections: Tensor         # [M] projections made in each module
    grad_norm: float            # norm of the final gradient (before any clipping)

    @property
    def cosine(self) -> Tensor:
        return cosines(self.gram)

    @property
    def conflicted(self) -> Tensor:
        """[M] bool: some pair of domains has a negative cosine in the module."""
        cos = self.cosine
        pairs = torch.triu(torch.ones_like(cos[0], dtype=torch.bool), diagonal=1)
        return (cos[:, pairs] < 0).any(-1) if pairs.any() else torch.zeros(len(self.modules), dtype=torch.bool)

    def summary(self, domains: Sequence[str]) -> dict[str, float]:
        """A few scalars for a logger: conflict rate, projections, and each pair's global and median module cosine."""
        out = {"conflict_fraction": float(self.conflicted.float().mean()) if self.modules else 0.0,
               "projections": float(self.projections.sum()), "grad_norm": self.grad_norm}
        whole = cosines(self.gram.sum(0, keepdim=True))[0]
        cos = self.cosine
        for a in range(len(domains)):
            for b in range(a + 1, len(domains)):
                pair = f"{domains[a]}|{domains[b]}"
                out[f"cos_global/{pair}"] = float(whole[a, b])
                out[f"cos_median/{pair}"] = float(cos[:, a, b].median()) if self.modules else 0.0
        return out


def modular_gradient_surgery(domain_grads: Mapping[str, Tensor], partition: Mapping[str, str | None],
                             generator: torch.Generator | None = None,
                             project: bool = True) -> tuple[dict[str, Tensor], SurgeryStats]:
    """The surgered gradient of every parameter from its per-domain gradients ``[D, *shape]``.

    ``partition`` maps each name to its module key (``None``: summed without projection).
    With ``project=False`` the result is the plain sum (mixing), and the stats still describe
    the conflicts.
    """
    missing = [name for name in domain_grads if name not in partition]
    if missing:
        raise KeyError(f"no module key for parameters {missing[:3]} (build the partition from the same names)")
    keys: list[str] = []
    slot: dict[str, int] = {}
    for name in domain_grads:
        key = partition[name]
        if key is not None and key not in slot:
            slot[key] = len(keys)
            keys.append(key)
    first = next(iter(domain_grads.values()), None)
    domains = first.shape[0] if first is not None else 0
    device = first.device if first is not None else torch.device("cpu")
    gram = torch.zeros(len(keys), domains, domains, dtype=torch.float64, device=device)
    for name, grads in domain_grads.items():
        if partition[name] is not None:
            flat = grads.reshape(domains, -1).double()
            gram[slot[partition[name]]] += flat @ flat.T
    if project:
        coef, projections = pcgrad_coefficients(gram, generator)
        weights = coef.sum(1)                                  # [M, D]: G^m = sum_l weights[m, l] g_l^m
    else:
        projections = torch.zeros(len(keys), dtype=torch.long, device=device)
        weights = torch.ones(len(keys), domains, dtype=torch.float64, device=device)
    final: dict[str, Tensor] = {}
    square = torch.zeros((), dtype=torch.float64, device=device)
    for name, grads in domain_grads.items():
        key = partition[name]
        if key is None:
            combined = grads.sum(0)
        else:
            w = weights[slot[key]].to(grads.dtype)
            combined = torch.tensordot(w, grads, dims=1)
        final[name] = combined
        square += combined.double().pow(2).sum()
    return final, SurgeryStats(keys, gram, projections, float(square.sqrt()))
