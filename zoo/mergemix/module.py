"""``mergemix``: a causal LM trained on a domain mixture whose test step scores its capabilities.

Training is ``CausalLMModule``'s next-token cross-entropy (base pretraining, a domain expert with
``ratios = one_hot(k)``, a mixture model, or the final run on lambda*), with a constant learning
rate unless a scheduler is configured: experts must keep moving along their domain's gradient.

The test step is the capability evaluation MergeMix runs on every merged model: greedy decoding of
the datamodule's held-out prompts (``{"input_ids" [B, P], "domain_id" [B], "answers"}``) and exact
match per domain, logged as ``test/acc_<domain>``, with their plain mean as ``test/mean_acc``.
``MergeMixSearch`` loads a merged state dict into this module and runs ``trainer.test``.

Hooks: ``greedy_decode(prompt_ids, max_new_tokens)`` and ``score_answers(generated, answers)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zoo.causal_lm.module import CausalLMModule


class MergeMixModule(CausalLMModule):
    zoo_name = "mergemix"
    card_notes = ("MergeMix (arXiv 2601.17858): capability = exact-match accuracy of greedy answers to held-out "
                  "prompts of each domain. The search (zoo.mergemix.search.MergeMixSearch) trains one expert per "
                  "domain from a shared base with a constant LR, evaluates merges base + sum_k a_k (expert_k - "
                  "base) at seed weights, fits one quadratic-ridge surrogate per capability (LightGBM in the "
                  "paper; not installed here), maximises the mean of min-max-normalised capability scores on "
                  "the simplex, verifies the optimum with a real merge, and returns it as the data mixture.")

    def __init__(self, backbone: str = "tiny-llama-char", backbone_overrides: dict[str, Any] | None = None,
                 dtype: str = "float32", ignore_index: int = -100, gradient_checkpointing: bool = False,
                 optimizer: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None,
                 max_new_tokens: int = 8) -> None:
        super().__init__(backbone=backbone, backbone_overrides=backbone_overrides, dtype=dtype,
                         ignore_index=ignore_index, gradient_checkpointing=gradient_checkpointing,
                         optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters()
        self._capability_sums: dict[int, Tensor] = {}

    # -- hooks -------------------------------------------------------------------------
    @torch.no_grad()
    def greedy_decode(self, prompt_ids: Tensor, max_new_tokens: int) -> Tensor:
        """``[B, max_new_tokens]`` greedy continuations of equal-length, unpadded prompts."""
        ids = prompt_ids
        for _ in range(max_new_tokens):
            next_ids = self(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
        return ids[:, prompt_ids.shape[1]:]

    def score_answers(self, generated: Tensor, answers: list[str]) -> Tensor:
        """1.0 where the text before the first end-of-sequence token equals the answer."""
        eos = self.tokenizer.eos_token_id
        scores = []
        for row, answer in zip(generated.tolist(), answers):
            cut = row.index(eos) if eos in row else len(row)
            scores.append(float(cut < len(row) and self.tokenizer.decode(row[:cut]) == answer))
        return torch.tensor(scores, dtype=torch.float64)

    # -- Lightning ---------------------------------------------------------------------
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        longest = max(len(a) for a in batch["answers"]) + 1
        generated = self.greedy_decode(batch["input_ids"], min(longest, self.hparams.max_new_tokens))
        correct = self.score_answers(generated, batch["answers"])
        for domain in batch["domain_id"].unique().tolist():
            picked = (batch["domain_id"] == domain).cpu()
            sums = torch.stack([correct[picked].sum(), picked.sum().double()])
            self._capability_sums[domain] = self._capability_sums.get(domain, 0) + sums

    def on_test_epoch_end(self) -> None:
        names = self._domain_names()
        sums, self._capability_sums = self._capability_sums, {}
        metrics = {}
        for domain, name in enumerate(names):
            local = sums.get(domain, torch.zeros(2, dtype=torch.float64))
            correct, count = self.trainer.strategy.reduce(local.to(self.device), reduce_op="sum").tolist()
            metrics[f"test/acc_{name}"] = correct / max(count, 1.0)
        metrics["test/mean_acc"] = sum(metrics.values()) / max(len(metrics), 1)
        for key, value in metrics.items():
            self.log(key, value)
        self.test_metrics = metrics

    def _domain_names(self) -> list[str]:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "domains", None)
        if names:
            return list(names)
        return [str(d) for d in range(max(self._capability_sums, default=-1) + 1)]
