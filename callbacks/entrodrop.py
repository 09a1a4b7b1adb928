"""EntroDrop: entropy-guided token dropout on a curriculum (Wang, Hu et al., arXiv 2512.23422).

Before each training step, a no-grad pre-pass of the current model scores every target token
by its predictive entropy; the lowest-entropy fraction ``gamma`` of the micro-batch's loss
tokens are candidates, and each candidate is dropped with probability ``p(s)``, which ramps
from 0 to ``p_max`` over the run on a normalised sigmoid. ``mode="input"`` (default) hides a
dropped token from the input (``mask_token_id``) and keeps its label; ``mode="loss"`` removes
it from the loss and keeps the input. Validation, test and predict batches are never touched.
The paper's method section was not readable: the curriculum formula, the quantile selection,
the input/loss modes and every default are the spec's interpretation (docs: shared/papers/entrodrop.md).

Protocol a module must meet:
- a training batch is a dict with ``input_ids`` ``[B, T]`` and a separate ``labels`` ``[B, T]``
  (``ignore_index`` on prompt and padding positions); ``labels[:, t]`` is the target of the
  logits computed at position ``t - 1``, and the loss reads ``labels`` (never targets derived
  from the possibly edited ``input_ids``);
- ``forward_logits(batch) -> [B, T-1, V]``, entry ``t`` predicting ``labels[:, t + 1]`` (called
  under ``torch.no_grad`` with every submodule in eval mode, then restored);
- ``token_loss_mask(batch) -> [B, T-1]`` bool, the loss tokens;
- optionally ``tokenizer``: the default mask id (mask, else unk, else pad token) and the special
  tokens that are never dropped (document boundaries in packed streams).
Lightning training batches are edited in ``on_train_batch_start`` (``zoo.causal_lm``). A module
that builds token batches inside its own step (GRPO's supervised warm start) exposes a dict
``batch_transforms``; the callback registers itself there and the module calls
``transform(batch, module, step, total_steps)`` on each such batch.

DDP: nothing is communicated. The quantile is taken over each rank's own micro-batch, and the
Bernoulli draws come from a generator seeded by ``(seed, step, micro-batch, rank)``, so ranks
drop different tokens of their different data; ``p(s)`` depends only on the global step, the
same on every rank, so ranks always agree on whether a pre-pass runs. Batches a module builds
identically on every rank (the GRPO warm start, which keeps ranks equal without gradient
synchronisation) are seeded without the rank, so every rank draws the same mask there.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from zoo.blocks.rl.rollout import entropy_from_logits

MODES = ("input", "loss")
SCHEDULES = ("sigmoid", "linear", "constant")
SCORES = ("entropy", "surprisal")
TARGETS = ("p", "gamma")


def curriculum(step: int, total_steps: int, shape: str = "sigmoid", kappa: float = 10.0, mu: float = 0.5) -> float:
    """Regularisation strength in [0, 1] at optimizer step ``step`` of ``total_steps``.

    ``sigmoid``: ``[sig(kappa (r - mu)) - sig(-kappa mu)] / [sig(kappa (1 - mu)) - sig(-kappa mu)]``
    with ``r = step / total_steps``, so it is 0 at the start and 1 at the end exactly;
    ``linear``: ``r``; ``constant``: 1.
    """
    if shape not in SCHEDULES:
        raise ValueError(f"unknown EntroDrop schedule '{shape}'; choose one of {', '.join(SCHEDULES)}")
    if shape == "constant":
        return 1.0
    r = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if shape == "linear":
        return r
    sig = lambda u: 1.0 / (1.0 + math.exp(-u))
    low = sig(-kappa * mu)
    return (sig(kappa * (r - mu)) - low) / (sig(kappa * (1.0 - mu)) - low)


@torch.no_grad()
def token_scores(logits: Tensor, targets: Tensor, score: str = "entropy", chunk_rows: int = 8) -> Tensor:
    """Per-token predictive entropy (or surprisal ``-log p(target)``) in fp32, a few rows at a time."""
    if score not in SCORES:
        raise ValueError(f"unknown EntroDrop score '{score}'; choose one of {', '.join(SCORES)}")
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], chunk_rows):
        rows = logits[start:start + chunk_rows].float()
        if score == "entropy":
            out[start:start + chunk_rows] = entropy_from_logits(rows)
        else:
            picked = targets[start:start + chunk_rows].clamp(min=0).unsqueeze(-1)
            out[start:start + chunk_rows] = -torch.log_softmax(rows, dim=-1).gather(-1, picked).squeeze(-1)
    return out


def select_candidates(scores: Tensor, eligible: Tensor, gamma: float | None = None,
                      tau: float | None = None) -> tuple[Tensor, Tensor]:
    """The droppable positions and the score threshold that defines them (NaN when there are none).

    With ``gamma``: the ``floor(gamma * n)`` lowest-scoring of the ``n`` eligible positions, ties
    broken by position (so the highest-scoring one never is for ``gamma < 1``); with ``tau``:
    eligible positions scoring below it. No host synchronisation: the count stays a tensor.
    """
    if tau is not None:
        return eligible & (scores < tau), torch.tensor(float(tau))
    flat = scores.masked_fill(~eligible, float("inf")).flatten()
    order = flat.argsort(stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    count = (eligible.sum().double() * gamma).floor().long()
    threshold = torch.where(count > 0, flat[order[(count - 1).clamp(min=0)]], float("nan"))
    return (rank < count).view_as(eligible), threshold


def sample_drops(candidates: Tensor, p: float, seed: int) -> Tensor:
    """Each candidate dropped independently with probability ``p`` (draws made on the CPU, device-independent)."""
    draws = torch.rand(candidates.shape, generator=torch.Generator().manual_seed(seed))
    return candidates & (draws.to(candidates.device) < p)


def apply_drops(batch: dict[str, Tensor], drops: Tensor, mode: str, mask_token_id: int | None,
                ignore_index: int = -100) -> None:
    """Edit the batch dict: hide dropped inputs (labels kept) or ignore dropped labels (inputs kept).

    ``drops`` is ``[B, T-1]`` over target positions 1..T-1; the edited tensors are new ones, so
    a dataset that hands out stored tensors is never modified.
    """
    full = torch.nn.functional.pad(drops, (1, 0), value=False)
    if mode == "input":
        batch["input_ids"] = batch["input_ids"].masked_fill(full, mask_token_id)
    else:
        batch["labels"] = batch["labels"].masked_fill(full, ignore_index)


class EntroDrop(L.Callback):
    """Entropy-guided token dropout (see the module docstring for the protocol and the DDP notes).

    Args:
        mode: ``input`` (hide the token, keep its label) or ``loss`` (ignore its label).
        gamma: the eligible fraction by score (lowest first), per micro-batch.
        p_max: the drop probability at the end of the run.
        schedule: ``sigmoid`` (normalised; ``kappa`` steepness, ``mu`` midpoint), ``linear`` or ``constant``.
        schedule_target: ramp ``p`` (gamma fixed) or ``gamma`` (p fixed at ``p_max``).
        tau: an absolute score threshold instead of the ``gamma`` quantile.
        score: ``entropy`` of the predictive distribution, or ``surprisal`` of the target.
        mask_token_id: the id a dropped input becomes; null = the tokenizer's mask, unk or pad id.
        protect_special_tokens: never drop the tokenizer's special tokens (EOS between packed documents).
        seed: mixed with the step, micro-batch and rank into each step's Bernoulli draws.
        chunk_rows: batch rows per chunk when turning pre-pass logits into scores.
    """

    def __init__(self, mode: str = "input", gamma: float = 0.5, p_max: float = 0.3, schedule: str = "sigmoid",
                 kappa: float = 10.0, mu: float = 0.5, schedule_target: str = "p", tau: float | None = None,
                 score: str = "entropy", mask_token_id: int | None = None, protect_special_tokens: bool = True,
                 ignore_index: int = -100, seed: int = 0, chunk_rows: int = 8) -> None:
        for name, value, allowed in (("mode", mode, MODES), ("schedule", schedule, SCHEDULES),
                                     ("score", score, SCORES), ("schedule_target", schedule_target, TARGETS)):
            if value not in allowed:
                raise ValueError(f"EntroDrop {name} must be one of {', '.join(allowed)}, not '{value}'")
        if not (0.0 <= gamma <= 1.0 and 0.0 <= p_max <= 1.0):
            raise ValueError(f"EntroDrop needs 0 <= gamma <= 1 and 0 <= p_max <= 1 (got {gamma}, {p_max})")
        if tau is not None and schedule_target == "gamma":
            raise ValueError("EntroDrop: an absolute threshold tau has no gamma to ramp; use schedule_target=p")
        self.mode, self.gamma, self.p_max, self.schedule = mode, gamma, p_max, schedule
        self.kappa, self.mu, self.schedule_target, self.tau = kappa, mu, schedule_target, tau
        self.score, self.mask_token_id, self.protect_special_tokens = score, mask_token_id, protect_special_tokens
        self.ignore_index, self.seed, self.chunk_rows = ignore_index, seed, chunk_rows
        self.last_stats: dict[str, Any] = {}
        self.last_drops: Tensor | None = None
        self._through_module = False

    # -- the technique -------------------------------------------------------------------
    def strength(self, step: int, total_steps: int) -> tuple[float, float]:
        """``(p, gamma)`` at this step."""
        ramp = curriculum(step, total_steps, self.schedule, self.kappa, self.mu)
        if self.schedule_target == "p":
            return self.p_max * ramp, self.gamma
        return self.p_max, self.gamma * ramp

    def draw_seed(self, step: int, micro: int, rank: int) -> int:
        return hash((self.seed, step, micro, rank)) & (2 ** 63 - 1)

    def __call__(self, batch: dict[str, Tensor], module: Any, step: int, total_steps: int, micro: int = 0,
                 rank: int = 0) -> dict[str, Any]:
        """Edit ``batch`` in place for optimizer step ``step``; returns the step's statistics.

        ``rank`` goes into the draws: pass it only where ranks train on different batches.
        """
        p, gamma = self.strength(step, total_steps)
        self.last_drops = None
        if p == 0.0 or (gamma == 0.0 and self.tau is None):
            self.last_stats = {"p": p, "gamma": gamma, "drop_frac": 0.0}
            return self.last_stats                    # bit-exact no-op: no pre-pass, nothing edited
        modes = {sub: sub.training for sub in module.modules()}
        module.eval()                                 # hidden dropout off: it would perturb the scores
        try:
            with torch.no_grad():
                logits = module.forward_logits(batch)
                valid = module.token_loss_mask(batch)
                targets = batch["labels"][:, 1:]
                scores = token_scores(logits, targets, self.score, self.chunk_rows)
                del logits
        finally:
            for sub, training in modes.items():
                sub.training = training
        eligible = valid & ~self._protected(targets, module)
        candidates, threshold = select_candidates(scores, eligible, gamma, self.tau)
        drops = sample_drops(candidates, p, self.draw_seed(step, micro, rank))
        apply_drops(batch, drops, self.mode, self._mask_id(module), self.ignore_index)
        kept = eligible & ~drops
        self.last_drops = drops
        # Tensors, not floats: logging them does not wait for the device. NaN where a set is empty.
        self.last_stats = {
            "p": p, "gamma": gamma, "drop_frac": drops.sum() / valid.sum().clamp(min=1),
            "entropy_threshold": threshold,
            "entropy_dropped": scores.where(drops, 0.0).sum() / drops.sum(),
            "entropy_kept": scores.where(kept, 0.0).sum() / kept.sum(),
        }
        return self.last_stats

    def _protected(self, targets: Tensor, module: Any) -> Tensor:
        tokenizer = getattr(module, "tokenizer", None)
        if not self.protect_special_tokens or tokenizer is None:
            return torch.zeros_like(targets, dtype=torch.bool)
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=targets.device)
        return torch.isin(targets, special)

    def _mask_id(self, module: Any) -> int | None:
        if self.mode == "loss" or self.mask_token_id is not None:
            return self.mask_token_id
        tokenizer = getattr(module, "tokenizer", None)
        for name in ("mask_token_id", "unk_token_id", "pad_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                return int(value)
        raise ValueError("EntroDrop input mode needs a mask id: set mask_token_id, or give the module a "
                         "tokenizer with a mask, unk or pad token")

    # -- Lightning -----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return                                    # evaluation is never touched
        needed = ("forward_logits", "token_loss_mask")
        missing = [name for name in needed if not callable(getattr(pl_module, name, None))]
        if missing:
            raise TypeError(f"EntroDrop needs {type(pl_module).__name__} to provide {' and '.join(missing)} "
                            "(see callbacks/entrodrop.py for the protocol)")
        self._mask_id(pl_module)                      # fail at setup, not at the first dropped token
        transforms = getattr(pl_module, "batch_transforms", None)
        self._through_module = isinstance(transforms, dict)
        if self._through_module:
            transforms["entrodrop"] = self

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._through_module:
            pl_module.batch_transforms.pop("entrodrop", None)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._through_module:
            return                                    # the module applies it to the token batches it builds
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
            raise TypeError("EntroDrop needs training batches that are dicts with input_ids and labels; "
                            f"{type(pl_module).__name__} gave {type(batch).__name__}")
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            if self.schedule != "constant":
                raise ValueError("EntroDrop's curriculum needs a finite run: set trainer.max_steps or max_epochs")
            total = 1                                 # a constant schedule ignores the run length
        with trainer.precision_plugin.forward_context():
            stats = self(batch, pl_module, trainer.global_step, int(total),
                         micro=batch_idx % trainer.accumulate_grad_batches, rank=trainer.global_rank)
        # Lightning writes step metrics every log_every_n_steps only, and logging six values costs
        # about a tenth of a tiny model's step, so log on those steps alone.
        if trainer._logger_connector.should_update_logs:
            size = batch["input_ids"].shape[0]
            pl_module.log_dict({f"entrodrop/{k}": v for k, v in stats.items()}, batch_size=size)
