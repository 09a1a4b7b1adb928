"""``causal_lm``: next-token cross-entropy on token batches over any causal LM.

A batch is ``{"input_ids": [B, T], "attention_mask": [B, T], "labels": [B, T]}``; ``labels[t]``
is the target of the logits computed at position ``t - 1`` and ``-100`` (``ignore_index``)
marks positions that are not loss tokens (padding, prompts). Labels are never derived from
``input_ids`` here, so a technique may edit the inputs and keep the targets (EntroDrop).

Hooks a subclass or a technique uses:
- ``forward_logits(batch)``: logits ``[B, T-1, V]`` aligned with ``labels[:, 1:]``;
- ``token_loss_mask(batch)``: ``[B, T-1]`` bool, the loss tokens;
- ``token_losses(logits, batch)``: per-token cross-entropy ``[B, T-1]`` (0 off the mask);
- ``loss(batch)``: the training loss (token mean plus every ``self.loss_terms`` entry) and stats.

Every term in ``self.loss_terms`` is called as ``term(logits, mask, module)`` and added to the
training loss (TRE attaches there), as in the policy-gradient core.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.backbones import build_backbone
from zoo.base import ZooModule

Batch = dict[str, Tensor]
LossTerm = Callable[[Tensor, Tensor, "CausalLMModule"], Tensor]


class CausalLMModule(ZooModule):
    """Pretraining / SFT of a causal LM on packed or padded token batches."""

    zoo_name = "causal_lm"
    card_notes = ("Generic causal-LM entry: token-mean next-token cross-entropy over the positions whose label "
                  "is not -100. Validation and test losses are token means over every rank's loss tokens; "
                  "the training loss is each rank's own token mean (DDP averages the ranks' gradients).")

    def __init__(
        self,
        backbone: str = "tiny-llama",
        backbone_overrides: dict[str, Any] | None = None,
        dtype: str = "float32",
        ignore_index: int = -100,
        gradient_checkpointing: bool = False,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model, self.tokenizer = build_backbone(backbone, causal_lm=True, padding_side="right",
                                                    config_overrides=backbone_overrides, dtype=dtype)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.loss_terms: dict[str, LossTerm] = {}
        self.history: list[dict[str, float]] = []
        self.test_metrics: dict[str, float] = {}
        self._kind_sums: dict[str, Tensor] = {}

    # -- hooks ---------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, V]`` for every position."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def forward_logits(self, batch: Batch) -> Tensor:
        """Logits ``[B, T-1, V]``: entry ``t`` predicts ``labels[:, t + 1]``."""
        return self(batch["input_ids"], batch.get("attention_mask"))[:, :-1]

    def token_loss_mask(self, batch: Batch) -> Tensor:
        return batch["labels"][:, 1:] != self.hparams.ignore_index

    def token_losses(self, logits: Tensor, batch: Batch) -> Tensor:
        """Cross-entropy of each target token in fp32, 0 where the label is ``ignore_index``."""
        targets = batch["labels"][:, 1:]
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none",
                               ignore_index=self.hparams.ignore_index).view_as(targets)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.forward_logits(batch)
        mask = self.token_loss_mask(batch)
        tokens = mask.sum()
        ce = self.token_losses(logits, batch).sum() / tokens.clamp(min=1)
        loss = ce
        stats = {"ce": ce.detach(), "tokens": tokens.detach().float()}
        for name, term in self.loss_terms.items():
            value = term(logits, mask, self)
            stats[f"term/{name}"] = value.detach()
            loss = loss + value
        return loss, stats

    # -- Lightning -----------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, stats = self.loss(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=size)
        return loss

    def _evaluate(self, batch: Batch) -> None:
        mask = self.token_loss_mask(batch)
        losses = self.token_losses(self.forward_logits(batch), batch)
        self.accumulate_metrics({"loss": losses.sum()}, mask.sum())
        kinds = self._token_kinds()
        if kinds and "token_kind" in batch:
            kind = batch["token_kind"][:, 1:]
            for index, name in enumerate(kinds):
                picked = mask & (kind == index)
                sums = torch.stack([losses[picked].sum(), picked.sum()]).double().detach().cpu()
                self._kind_sums[name] = self._kind_sums.get(name, 0) + sums

    def _token_kinds(self) -> tuple[str, ...]:
        """Names of the datamodule's ``token_kind`` ids (generated data labels template vs content tokens)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return tuple(getattr(datamodule, "token_kinds", ()) or ())

    def _summarise(self, stage: str) -> dict[str, float]:
        metrics = self.reduce_metrics(stage, prog_bar="loss")
        metrics[f"{stage}/ppl"] = math.exp(min(metrics.get(f"{stage}/loss", 0.0), 50.0))
        self.log(f"{stage}/ppl", metrics[f"{stage}/ppl"])
        kind_sums, self._kind_sums = self._kind_sums, {}
        for name in self._token_kinds():
            local = kind_sums.get(name, torch.zeros(2, dtype=torch.float64))
            total, count = self.trainer.strategy.reduce(local.to(self.device), reduce_op="sum").tolist()
            if count:
                metrics[f"{stage}/loss_{name}"] = total / count
                self.log(f"{stage}/loss_{name}", total / count)
        return metrics

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        metrics = self._summarise("val")
        # only the fit loop's own validations: WSM validates its merged weights in a separate pass
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            self.history.append({"epoch": self.current_epoch, "step": self.global_step, **metrics})

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._summarise("test")

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero and self.history:
            path = Path(self.trainer.default_root_dir) / "lm_history.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def backbone_parts(self) -> tuple[Any, Any]:
        return self.model, self.tokenizer
