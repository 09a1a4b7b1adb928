"""User-aware unbiased learning to rank (Niu et al., CIKM 2025, arXiv 2508.20798).

Clicks come from users who examine positions differently and favour different queries. The
user-aware estimator divides a query's click-through rate at position k by that query's own
user-weighted propensity θ̂_{q,k} = Σ_u P̂(u|q) θ_{u,k}: unbiased given the query's user mix, and
of lower variance than dividing each click by its own user's propensity. A feature-based ranker
is then trained with the listwise softmax loss on the estimated labels (or, equivalently in
expectation, on per-click IPS weights).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zoo.base import ZooModule
from zoo.blocks.clicks import ESTIMATORS, click_weights, estimate_relevance
from zoo.blocks.ltr import (
    build_scorer,
    has_relevant,
    list_metrics,
    listwise_softmax_loss,
)

TRUE_LABELS = "true"   # the full-information skyline: every document's true relevance probability


class UserAwareULTRModule(ZooModule):
    """Hooks to override: ``score``, ``propensities``, ``estimate_labels``, ``session_weights``,
    ``training_labels``, ``loss``."""

    zoo_name = "ultr_user_aware"
    card_notes = (
        "Measured (benchmarks/ultr_yahoo.py; mean over 20 seeds, MLP [64, 32], Adagrad 0.05, 300 steps, best "
        "validation nDCG@5 kept). Yahoo LTR sample (201 queries, 60/20/20 split), U=10, 200k sessions, ridge "
        "logging ranker: test nDCG@10 skyline (true labels) 0.7316, user-aware IPS 0.7277, per-user IPS "
        "(straightforward) 0.7193, IPS-PBM 0.7281, raw clicks 0.7259, logging ranker 0.7003; training-label MAE "
        "user-aware 0.030, straightforward 0.059, IPS-PBM 0.179, raw clicks 0.296. On this small sample the "
        "ranking gap between user-aware, IPS-PBM and raw clicks is within noise (paired user-aware minus IPS-PBM "
        "-0.0004 +/- 0.0036 se); user-aware beats straightforward by +0.0083 +/- 0.0037. Embedded default "
        "(generated, U=10, 20k sessions): nDCG@10 skyline 0.9391, user-aware 0.9104, straightforward 0.9041, "
        "IPS-PBM 0.9085, raw clicks 0.9016; label MAE 0.135 / 0.242 / 0.278 / 0.394 (the spec's expected "
        "ordering). "
        "Readings: propensities are the simulator's oracle theta_{u,k} (the reference; `propensities` is the hook "
        "for estimated ones, e.g. zoo.blocks.clicks.fit_pbm_em per user, which needs logged lists that vary); "
        "IPS-PBM divides by the session-weighted average propensity (the reference code); P(u|q) is the raw "
        "session share (`smoothing`=0); the skyline trains on gamma = eps + (1-eps) y/4 of every candidate; "
        "unshown documents and queries without sessions get label 0 (the latter are left out of the label MAE); "
        "nDCG is averaged over queries with a relevant document. The Yahoo sample has no init_list, so the logged "
        "list is the top 10 of a ridge ranker fitted on 10% of the training queries. The ranker is the spec's "
        "demo size (the reference: [512, 256, 128], lr 0.01, 1,000 steps). Click-level IPS "
        "(data.train_unit=sessions) equals the label-level objective up to the batch normaliser."
    )

    def __init__(
        self,
        n_features: int = 16,
        scorer: dict | None = None,
        estimator: str = "user_aware",
        smoothing: float = 0.0,
        metrics_at: list[int] | None = None,
        select_metric: str = "ndcg@5",
        keep_best: bool = True,
        grad_clip: float | None = 5.0,
        max_grade: int = 4,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
    ) -> None:
        super().__init__()
        if estimator not in (*ESTIMATORS, TRUE_LABELS):
            raise ValueError(f"unknown estimator '{estimator}'; choose one of {', '.join((*ESTIMATORS, TRUE_LABELS))}")
        self.save_hyperparameters()
        self.scorer = build_scorer(n_features, **(scorer or {"kind": "mlp", "hidden": [64, 32]}))
        self.metrics_at = tuple(metrics_at or (1, 3, 5, 10))
        if select_metric not in [f"{m}@{k}" for m in ("ndcg", "err") for k in self.metrics_at]:
            raise ValueError(f"select_metric '{select_metric}' is not among the computed metrics (metrics_at)")
        self.position_labels: Tensor | None = None    # [Q_train, K] estimated labels
        self.click_level_weights: Tensor | None = None  # [S, K] per-click IPS weights
        self.label_mae: float | None = None
        self._best: dict[str, Any] | None = None
        self.test_metrics: dict[str, float] = {}

    # -- hooks ---------------------------------------------------------------------------
    def score(self, features: Tensor) -> Tensor:
        return self.scorer(features)

    def propensities(self, log: Any) -> Tensor:
        """θ [U, K] the estimators divide by: the simulator's own curves (oracle propensities)."""
        return log.theta

    def estimate_labels(self, log: Any) -> Tensor:
        """γ̂ [Q_train, K] from the click log with the configured estimator."""
        labels, _ = estimate_relevance(log.clicks, log.query, log.user, self.propensities(log), log.n_queries,
                                       self.hparams.estimator, self.hparams.smoothing)
        return labels

    def session_weights(self, log: Any) -> Tensor:
        """Per-click IPS weights [S, K]; a query's sessions sum to its estimated labels."""
        return click_weights(log.clicks, log.query, log.user, self.propensities(log), log.n_queries,
                             self.hparams.estimator, self.hparams.smoothing)

    def training_labels(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-document training labels [B, L]; documents the logged list did not show get 0."""
        if self.hparams.estimator == TRUE_LABELS:
            return batch["relevance"].float()
        if "session_index" in batch:
            per_position = self.click_level_weights[batch["session_index"].cpu()]
        else:
            per_position = self.position_labels[batch["query_index"].cpu()]
        per_position = per_position.to(self.device, torch.float32)
        shown = batch["position"] >= 0
        labels = per_position.gather(1, batch["position"].clamp_min(0))
        return torch.where(shown, labels, torch.zeros_like(labels))

    def loss(self, scores: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
        return listwise_softmax_loss(scores, labels, mask)

    # -- setup ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.hparams.estimator == TRUE_LABELS:
            return
        log = self.trainer.datamodule.click_log
        self.position_labels = self.estimate_labels(log)
        self.click_level_weights = self.session_weights(log)
        # Label error on the shown positions of queries that got sessions (as the spec asks).
        seen = (torch.bincount(log.query, minlength=log.n_queries) > 0)[:, None] & (log.shown >= 0)
        self.label_mae = float((self.position_labels - log.gamma).abs()[seen].mean())

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        scores = self.score(batch["features"])
        loss = self.loss(scores, self.training_labels(batch), batch["mask"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["mask"].shape[0])
        return loss

    # -- evaluation ----------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Tensor]) -> None:
        with torch.no_grad():
            scores = self.score(batch["features"])
        valid = has_relevant(batch["labels"], batch["mask"])
        metrics = list_metrics(scores, batch["labels"], batch["mask"], self.metrics_at, self.hparams.max_grade)
        self.accumulate_metrics({name: values[valid].sum() for name, values in metrics.items()}, valid.sum())

    def _finish_eval(self, prefix: str) -> dict[str, float]:
        return self.reduce_metrics(prefix, prog_bar=self.hparams.select_metric)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        metrics = self._finish_eval("val")
        value = metrics.get(f"val/{self.hparams.select_metric}")
        if self.hparams.keep_best and not self.trainer.sanity_checking and value is not None \
                and (self._best is None or value > self._best["score"]):
            self._best = {"score": value, "step": self.global_step,
                          "state": {k: v.detach().clone() for k, v in self.state_dict().items()}}

    def on_fit_end(self) -> None:
        # Reference protocol: the reported model is the one with the best validation metric.
        if self.hparams.keep_best and self._best is not None:
            self.load_state_dict(self._best["state"])

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._finish_eval("test")
        if self.label_mae is not None:
            self.test_metrics["train/label_mae"] = self.label_mae
        if self._best is not None:
            self.test_metrics["val/best_" + self.hparams.select_metric] = self._best["score"]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._best is not None:
            checkpoint["ultr_best"] = self._best

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._best = checkpoint.get("ultr_best")
