"""TRE (trust-region entropy, arXiv 2602.03635) as a loss term any zoo module can take.

Protocol: the module has a ``loss_terms`` dict whose entries its training loss calls as
``term(logits, mask, module)`` and adds (grpo, ppo, causal_lm and everything built on them).
``logits`` are the per-token logits of the loss positions ``[..., V]`` (temperature applied,
as for the log-probs) and ``mask`` marks the positions the loss counts. The callback adds
itself there in ``setup`` and removes itself in ``teardown``; a callback alone could not act,
because the term must be inside the loss before ``backward``.

The term is ``-coef * agg(H~)`` with ``H~`` one of

- ``tre_k`` / ``tre_p``: the entropy of the policy renormalised over its top-K tokens / its
  nucleus of mass P (at most ``max_candidates`` tokens), scaled by ``log|V| / log|A_t|``;
- ``global``: the full-vocabulary entropy (the standard bonus, for comparison);
- ``none``: nothing is added (the loss is bit-identical to the module's own), only diagnostics.

``agg`` is the module's policy-loss aggregation (``auto``: ``module.loss_cfg["agg"]`` where the
module has one, else the token mean), so TRE weighs tokens the way the loss it joins does.
The term's gradient to the logits is sparse (``sparse_grad``): the host's own loss already
sends a dense gradient into the same logits, and autograd adds the region entries into it in
place, so the term costs no second ``tokens x V`` tensor (set it false for logits nothing else
back-propagates into). The term is per token and local to each rank: under DDP it is reduced
like the loss it is added to (each rank's own mean, gradients averaged), with no extra
communication.

Diagnostics (no gradient), averaged over the loss calls of a training step and logged as
``tre/*``: full entropy, the TRE value, mean region size, top-1 probability, and the tail mass
outside the ``tail_k`` most probable tokens. ``history`` keeps one record per step.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from zoo.blocks.entropy import entropy, masked_mean, tail_mass, top1_probability, trust_region, trust_region_entropy
from zoo.blocks.rl.losses import aggregate

MODES = ("none", "global", "tre_k", "tre_p")


class TRE(L.Callback):
    def __init__(self, mode: str = "tre_k", coef: float = 0.001, k: int = 2, p: float = 0.99,
                 max_candidates: int = 256, scale: bool = True, vocab_size: int | None = None, agg: str = "auto",
                 diagnostics: bool = True, tail_k: int = 5, name: str = "tre", chunk_size: int = 8192,
                 sparse_grad: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown TRE mode '{mode}'; choose one of {', '.join(MODES)}")
        if mode == "tre_k" and k < 2:
            raise ValueError(f"TRE-K needs k >= 2 (k={k} is no trust region)")
        self.mode, self.coef, self.k, self.p = mode, float(coef), int(k), float(p)
        self.max_candidates, self.scale, self.vocab_size = int(max_candidates), bool(scale), vocab_size
        self.agg, self.diagnostics, self.tail_k, self.name = agg, bool(diagnostics), int(tail_k), name
        self.chunk_size, self.sparse_grad = int(chunk_size), bool(sparse_grad)
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}
        self._calls = 0

    # -- the term ----------------------------------------------------------------------------
    def bonus(self, logits: Tensor, mask: Tensor) -> Tensor:
        """The per-token quantity whose aggregate is rewarded (``H~`` above)."""
        if self.mode == "global":
            values = entropy(logits)
            return torch.where(mask.bool(), values, torch.zeros_like(values))
        region = "topk" if self.mode == "tre_k" else "topp"
        return trust_region_entropy(logits, mask, region, self.k, self.p, self.max_candidates, self.scale,
                                    self.vocab_size, self.chunk_size, self.sparse_grad)[0]

    def aggregation(self, module: Any) -> tuple[str, int | None]:
        if self.agg != "auto":
            return self.agg, None
        loss_cfg = getattr(module, "loss_cfg", None) or {}
        mode = loss_cfg.get("agg", "token_mean")
        max_length = loss_cfg.get("max_length") or getattr(module, "rollout_cfg", {}).get("max_new_tokens")
        return mode, max_length

    def __call__(self, logits: Tensor, mask: Tensor, module: Any) -> Tensor:
        if self.diagnostics and torch.is_grad_enabled():
            self._record(logits, mask)
        if self.mode == "none" or not self.coef:
            return logits.new_zeros(())                      # adds exactly 0: the loss stays bit-identical
        mode, max_length = self.aggregation(module)
        return -self.coef * aggregate(self.bonus(logits, mask), mask, mode, max_length)

    @torch.no_grad()
    def _record(self, logits: Tensor, mask: Tensor) -> None:
        logits = logits.detach()
        stats = {"entropy": masked_mean(entropy(logits), mask),
                 "top1_prob": masked_mean(top1_probability(logits), mask),
                 f"tail_mass@{self.tail_k}": masked_mean(tail_mass(logits, self.tail_k), mask)}
        if self.mode in ("tre_k", "tre_p"):
            region = "topk" if self.mode == "tre_k" else "topp"
            _, member = trust_region(logits, region, self.k, self.p, self.max_candidates, self.chunk_size)
            stats["region_size"] = masked_mean(member.sum(-1).float(), mask)
            stats["value"] = masked_mean(self.bonus(logits, mask), mask)
        for key, value in stats.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._calls += 1

    # -- Lightning ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        terms = getattr(pl_module, "loss_terms", None)
        if not isinstance(terms, dict):
            raise TypeError(f"TRE needs a module with a `loss_terms` dict called as term(logits, mask, module) "
                            f"inside its loss; {type(pl_module).__name__} has none")
        if self.name in terms and terms[self.name] is not self:
            raise ValueError(f"{type(pl_module).__name__}.loss_terms already has a term named '{self.name}'")
        terms[self.name] = self

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        terms = getattr(pl_module, "loss_terms", {})
        if terms.get(self.name) is self:
            del terms[self.name]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._calls:
            return
        record = {key: value / self._calls for key, value in self._sums.items()}
        self._sums, self._calls = {}, 0
        self.history.append({"step": trainer.global_step, **record})
        pl_module.log_dict({f"{self.name}/{k}": v for k, v in record.items()}, on_step=True, on_epoch=False)
