"""Query-level satisfaction prediction from usefulness labels and behaviour (the paper's downstream use).

Features of a query q with clicked documents D and labels y (our interpretation of the unread
experiments): label features [mean, max, min, sum of y] and behaviour features [|D|, mean dwell,
max dwell, deepest click rank, mean clicked rank]. ``SatisfactionPredictor`` is a 2-layer MLP over
the chosen groups (``features``: all | labels | behaviour), trained with MSE; its test metrics are
Pearson, Spearman and MAE against the users' satisfaction. ``gbdt_baseline`` is the reference
code's gradient-boosted trees (no grid search; the target is never among the features).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from zoo.base import ZooModule
from zoo.usefulness_labels.metrics import pearson, spearman

FEATURE_GROUPS = ("all", "labels", "behaviour")
LABEL_FEATURES = ("label_mean", "label_max", "label_min", "label_sum")
BEHAVIOUR_FEATURES = ("clicks", "dwell_mean", "dwell_max", "deepest_rank", "rank_mean")


def query_features(labels: Sequence[int], docs: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(label features, behaviour features) of one query."""
    y = [float(v) for v in labels]
    dwell = [float(d["dwell"]) for d in docs]
    ranks = [float(d["rank"]) for d in docs]
    return ([sum(y) / len(y), max(y), min(y), sum(y)],
            [float(len(docs)), sum(dwell) / len(dwell), max(dwell), max(ranks), sum(ranks) / len(ranks)])


def select_features(batch: dict[str, torch.Tensor], features: str) -> torch.Tensor:
    if features == "labels":
        return batch["label_features"]
    if features == "behaviour":
        return batch["behaviour_features"]
    return torch.cat([batch["label_features"], batch["behaviour_features"]], dim=-1)


class SatisfactionPredictor(ZooModule):
    """MLP over query features -> satisfaction. Hooks: ``inputs`` (features of a batch), ``loss``."""

    zoo_name = "usefulness_labels"
    card_notes = ("Satisfaction predictor over query aggregates of usefulness labels and behaviour (the zoo's "
                  "interpretation of the paper's unread downstream experiment).")

    def __init__(self, features: str = "all", hidden_size: int = 32, dropout: float = 0.0,
                 optimizer: dict | None = None, seed: int = 0) -> None:
        super().__init__()
        if features not in FEATURE_GROUPS:
            raise ValueError(f"unknown model.features '{features}'; choose one of {', '.join(FEATURE_GROUPS)}")
        self.save_hyperparameters()
        width = {"all": len(LABEL_FEATURES) + len(BEHAVIOUR_FEATURES), "labels": len(LABEL_FEATURES),
                 "behaviour": len(BEHAVIOUR_FEATURES)}[features]
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)     # the same initial weights whatever ran before (fair feature comparisons)
        self.net = nn.Sequential(nn.Linear(width, hidden_size), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_size, 1))
        torch.random.set_rng_state(generator_state)
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.test_metrics: dict[str, float] = {}

    def inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return select_features(batch, self.hparams.features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(prediction, target)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(self.inputs(batch)), batch["satisfaction"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["satisfaction"]))
        return loss

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._outputs.append((self(self.inputs(batch)).detach(), batch["satisfaction"]))

    def on_test_epoch_end(self) -> None:
        if not self._outputs:
            return
        pred = torch.cat([p for p, _ in self._outputs])
        gold = torch.cat([g for _, g in self._outputs])
        if self.trainer.world_size > 1:     # correlations need every rank's queries
            pred, gold = self.all_gather(pred).flatten(), self.all_gather(gold).flatten()
        p, g = pred.cpu().numpy(), gold.cpu().numpy()
        self.test_metrics = {"test/pearson": pearson(p, g), "test/spearman": spearman(p, g),
                             "test/mae": float(np.abs(p - g).mean())}
        for key, value in self.test_metrics.items():
            self.log(key, value, prog_bar=key == "test/pearson", rank_zero_only=True)


def gbdt_baseline(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The reference ML script's model (gradient-boosted trees, one mid-grid setting, features
    standardised); predictions for ``test_x``."""
    from sklearn.ensemble import GradientBoostingRegressor

    model = GradientBoostingRegressor(n_estimators=100, learning_rate=0.1, max_depth=3, subsample=0.9,
                                      random_state=seed)
    return model.fit(train_x, train_y).predict(test_x)
