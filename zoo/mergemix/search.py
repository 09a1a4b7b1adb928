"""``MergeMixSearch``: choose data-mixture ratios by merging domain experts (arXiv 2601.17858).

Pipeline (``run``), each step a method a subclass may override:
1. ``pretrain``: the base model, trained ``base_steps`` on the uniform mixture (or ``base_state`` given);
2. ``train_experts``: one expert per domain from the base, ``expert_steps`` on ``ratios = one_hot(k)``
   with the module's constant learning rate (or ``expert_lr``, which the validation mixtures share);
3. ``seed_alphas`` -> ``merge`` -> ``evaluate``: capability scores of N seed merges
   ``base + sum_k a_k (expert_k - base)`` (``zoo.blocks.merging``, fp32, integer buffers copied);
4. ``fit_surrogates``: one regressor per capability on the N seeds;
5. ``propose``: the arg-max of U(f_1(a), ..., f_M(a)) over the simplex grid plus Dirichlet draws;
6. verify the proposal with a real merge; lambda* is the best *verified* point (the proposal, or the
   best seed if the merge falls short of it), and its reported utility is the verified one.
``validate(mixtures)`` trains one model per mixture from the base (``expert_steps`` each) and
reports Spearman's rho between the merge proxy's utility and the trained models' utility.

Lightning only trains (``CausalLMModule``'s loop in ``MergeMixModule``) and evaluates
(``trainer.test`` of ``MergeMixModule``); the search itself runs on CPU in numpy.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
from torch import Tensor

from datamodules.mixture import DomainMixtureDataModule
from zoo.blocks.merging import linear, task_arithmetic
from zoo.mergemix import simplex
from zoo.mergemix.module import MergeMixModule
from zoo.mergemix.surrogate import (
    NORMALISATIONS,
    Normaliser,
    build_surrogate,
    leave_one_out_error,
    spearman,
    utility,
)

StateDict = dict[str, Tensor]
MERGE_FORMS = ("base_relative", "convex")


def merge_experts(base: StateDict, experts: Sequence[StateDict], alpha: Sequence[float],
                  form: str = "base_relative", enforce_simplex: bool = True) -> StateDict:
    """Theta_base + sum_k a_k (Theta_k - Theta_base) (``base_relative``, also for unnormalised a when
    ``enforce_simplex`` is off) or sum_k a_k Theta_k (``convex``, exact at the vertices); equal on the simplex."""
    weights = [float(a) for a in alpha]
    if len(weights) != len(experts):
        raise ValueError(f"{len(weights)} merge weights for {len(experts)} experts")
    if enforce_simplex and (min(weights) < -1e-12 or abs(sum(weights) - 1.0) > 1e-6):
        raise ValueError(f"merge weights must lie on the simplex (>= 0, sum 1), got {weights}; "
                         "set enforce_simplex=false for affine merges")
    if form == "base_relative":
        return task_arithmetic(base, experts, weights)
    if form == "convex":
        return linear(experts, weights, normalize=False)
    raise ValueError(f"unknown merge form '{form}'; choose one of {', '.join(MERGE_FORMS)}")


@dataclass
class SearchResult:
    domains: list[str]
    seed_alphas: np.ndarray              # [N, K]
    seed_scores: np.ndarray              # [N, M] capability scores of the seed merges
    seed_utilities: np.ndarray           # [N]
    surrogate_loo_rmse: list[float]      # per capability
    proposed_alpha: np.ndarray           # arg-max of the surrogate utility
    predicted_utility: float             # the surrogate's U at the proposal
    verified_scores: np.ndarray          # a real merge at the proposal
    verified_utility: float
    best_seed_alpha: np.ndarray
    best_seed_utility: float
    uniform_utility: float               # the merge at the centroid
    lambda_star: np.ndarray              # the mixture to train on: the best verified point
    utility_by_normalisation: dict[str, float] = field(default_factory=dict)   # of the proposal, for the log

    def summary(self) -> dict[str, Any]:
        return {"domains": self.domains, "alpha_star": self.proposed_alpha.round(4).tolist(),
                "predicted_utility": self.predicted_utility, "verified_utility": self.verified_utility,
                "verified_scores": self.verified_scores.round(4).tolist(),
                "best_seed_alpha": self.best_seed_alpha.round(4).tolist(), "best_seed_utility": self.best_seed_utility,
                "uniform_utility": self.uniform_utility, "lambda_star": self.lambda_star.round(4).tolist(),
                "surrogate_loo_rmse": self.surrogate_loo_rmse, "seed_alphas": self.seed_alphas.round(4).tolist(),
                "seed_scores": self.seed_scores.round(4).tolist(),
                "utility_by_normalisation": self.utility_by_normalisation}


class MergeMixSearch:
    """``model``: ``MergeMixModule`` keyword arguments; ``data``: ``DomainMixtureDataModule`` keyword
    arguments (its ``ratios`` and ``num_train`` are set per run). Evaluations are cached by alpha."""

    def __init__(self, model: dict[str, Any], data: dict[str, Any], base_steps: int = 400, expert_steps: int = 150,
                 num_seeds: int = 15, prior: Sequence[float] | None = None, surrogate: str = "quadratic_ridge",
                 surrogate_options: dict[str, Any] | None = None, grid_step: float = 0.05,
                 dirichlet_samples: int = 2000, normalisation: str = "minmax",
                 capability_weights: Sequence[float] | None = None, merge_form: str = "base_relative",
                 expert_lr: float | None = None, trainer: dict[str, Any] | None = None, seed: int = 0,
                 log: Callable[[str], None] | None = print) -> None:
        self.model_cfg = {k: v for k, v in dict(model).items() if k != "_target_"}
        self.data_cfg = {k: v for k, v in dict(data).items() if k not in ("_target_", "ratios", "num_train")}
        self.base_steps, self.expert_steps, self.num_seeds = base_steps, expert_steps, num_seeds
        self.prior = None if prior is None else np.asarray(prior, dtype=np.float64)
        self.surrogate, self.surrogate_options = surrogate, dict(surrogate_options or {})
        self.grid_step, self.dirichlet_samples = grid_step, dirichlet_samples
        self.normalisation, self.capability_weights = normalisation, capability_weights
        self.merge_form, self.expert_lr = merge_form, expert_lr
        self.trainer_cfg, self.seed = dict(trainer or {}), seed
        self.log = log or (lambda message: None)
        self.eval_data = DomainMixtureDataModule(**self.data_cfg)
        self.domains = self.eval_data.domains
        self.base: StateDict | None = None
        self.experts: list[StateDict] = []
        self._evaluator: MergeMixModule | None = None
        self._scores: dict[tuple[float, ...], np.ndarray] = {}
        self.normaliser: Normaliser | None = None
        self.seed_scores: np.ndarray | None = None
        self.surrogates: list[Any] = []

    # -- training and evaluation hooks ----------------------------------------------------
    def new_module(self, lr: float | None = None) -> MergeMixModule:
        config = dict(self.model_cfg)
        if lr is not None:
            config["optimizer"] = {**dict(config.get("optimizer") or {"name": "AdamW"}), "lr": lr}
        return MergeMixModule(**config)

    def datamodule(self, ratios: Sequence[float], num_train: int) -> DomainMixtureDataModule:
        return DomainMixtureDataModule(**self.data_cfg, ratios=list(map(float, ratios)), num_train=num_train)

    def train(self, init: StateDict | None, ratios: Sequence[float], steps: int, lr: float | None = None) -> StateDict:
        """``steps`` optimiser steps on the ``ratios`` mixture from ``init`` (a fresh model if None), at the
        model config's learning rate unless ``lr`` is given."""
        L.seed_everything(self.seed, verbose=False)
        module = self.new_module(lr)
        if init is not None:
            module.load_state_dict(init)
        data = self.datamodule(ratios, num_train=steps * self.data_cfg.get("batch_size", 32))
        trainer = L.Trainer(**{"accelerator": "cpu", "devices": 1, "max_steps": steps, "max_epochs": -1,
                               "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                               "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                               "gradient_clip_val": 1.0, "default_root_dir": tempfile.mkdtemp(prefix="mergemix-"),
                               **self.trainer_cfg})
        trainer.fit(module, datamodule=data)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def evaluate_state(self, state: StateDict) -> np.ndarray:
        """Capability scores ``[M]`` (exact-match accuracy per domain) of a state dict."""
        if self._evaluator is None:
            self._evaluator = self.new_module()
        self._evaluator.load_state_dict(state)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tempfile.mkdtemp(prefix="mergemix-eval-"))
        trainer.test(self._evaluator, datamodule=self.eval_data, verbose=False)
        metrics = self._evaluator.test_metrics
        return np.array([metrics[f"test/acc_{name}"] for name in self.domains], dtype=np.float64)

    def merge(self, alpha: Sequence[float]) -> StateDict:
        if self.base is None or not self.experts:
            raise RuntimeError("MergeMixSearch.merge needs the base and the experts: call pretrain() and "
                               "train_experts() (or run()) first")
        return merge_experts(self.base, self.experts, alpha, form=self.merge_form)

    def evaluate(self, alpha: Sequence[float]) -> np.ndarray:
        """Capability scores of the real merge at ``alpha`` (cached)."""
        key = tuple(np.round(np.asarray(alpha, dtype=np.float64), 10).tolist())
        if key not in self._scores:
            self._scores[key] = self.evaluate_state(self.merge(alpha))
        return self._scores[key]

    # -- pipeline --------------------------------------------------------------------------
    def pretrain(self, base_state: StateDict | None = None) -> StateDict:
        start = time.perf_counter()
        if base_state is not None:
            self.base = base_state
            self.log("base: given")
        else:
            self.base = self.train(None, [1.0] * len(self.domains), self.base_steps)
            self.log(f"base: {self.base_steps} steps on the uniform mixture ({time.perf_counter() - start:.0f}s)")
        return self.base

    def train_experts(self) -> list[StateDict]:
        start = time.perf_counter()
        self.experts = [self.train(self.base, np.eye(len(self.domains))[k], self.expert_steps, self.expert_lr)
                        for k in range(len(self.domains))]
        self.log(f"experts: {len(self.experts)} x {self.expert_steps} steps ({time.perf_counter() - start:.0f}s)")
        return self.experts

    def seed_alphas(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return simplex.seed_design(len(self.domains), self.num_seeds, rng, prior=self.prior)

    def fit_surrogates(self, alphas: np.ndarray, scores: np.ndarray) -> list[float]:
        """One surrogate per capability; returns each one's leave-one-out RMSE."""
        self.surrogates = [build_surrogate(self.surrogate, **self.surrogate_options).fit(alphas, scores[:, m])
                           for m in range(scores.shape[1])]
        return [leave_one_out_error(self.surrogate, alphas, scores[:, m], **self.surrogate_options)
                for m in range(scores.shape[1])]

    def predict_scores(self, alphas: np.ndarray) -> np.ndarray:
        return np.column_stack([model.predict(alphas) for model in self.surrogates])

    def utility(self, scores: np.ndarray) -> np.ndarray:
        return utility(scores, self.normaliser, self.capability_weights)

    def propose(self) -> tuple[np.ndarray, float]:
        """The candidate (grid + Dirichlet draws) with the highest surrogate utility."""
        rng = np.random.default_rng(self.seed + 1)
        points = simplex.candidates(len(self.domains), self.grid_step, self.dirichlet_samples, rng)
        predicted = self.utility(self.predict_scores(points))
        best = int(np.argmax(predicted))
        return points[best], float(predicted[best])

    def run(self, base_state: StateDict | None = None) -> SearchResult:
        if self.base is None or base_state is not None:
            self.pretrain(base_state)
        if not self.experts:
            self.train_experts()
        start = time.perf_counter()
        alphas = self.seed_alphas()
        scores = np.stack([self.evaluate(a) for a in alphas])
        self.log(f"seeds: {len(alphas)} merges evaluated ({time.perf_counter() - start:.0f}s)")
        self.seed_scores = scores
        self.normaliser = Normaliser(scores, self.normalisation)
        seed_utilities = self.utility(scores)
        loo = self.fit_surrogates(alphas, scores)
        proposed, predicted = self.propose()
        verified_scores = self.evaluate(proposed)
        verified = float(self.utility(verified_scores)[0])
        best = int(np.argmax(seed_utilities))
        centroid = np.full(len(self.domains), 1.0 / len(self.domains))
        uniform = float(self.utility(self.evaluate(centroid))[0])
        lambda_star = proposed if verified >= seed_utilities[best] else alphas[best]
        by_normalisation = {kind: float(utility(verified_scores, Normaliser(scores, kind), self.capability_weights)[0])
                            for kind in NORMALISATIONS}
        result = SearchResult(self.domains, alphas, scores, seed_utilities, loo, proposed, predicted,
                              verified_scores, verified, alphas[best], float(seed_utilities[best]), uniform,
                              lambda_star, by_normalisation)
        self.log(f"alpha* = {proposed.round(3).tolist()}: predicted U {predicted:.3f}, verified U {verified:.3f} "
                 f"(best seed {seed_utilities[best]:.3f} at {alphas[best].round(3).tolist()}, uniform {uniform:.3f})")
        return result

    def validate(self, mixtures: np.ndarray) -> dict[str, Any]:
        """Train one model per mixture (``expert_steps`` from the base) and rank them against the proxies:
        the real merge at alpha = lambda and the surrogate's prediction."""
        if self.normaliser is None:
            raise RuntimeError("MergeMixSearch.validate needs the seed evaluations: call run() first")
        start = time.perf_counter()
        mixtures = np.atleast_2d(np.asarray(mixtures, dtype=np.float64))
        trained = np.stack([self.evaluate_state(self.train(self.base, lam, self.expert_steps, self.expert_lr))
                            for lam in mixtures])
        merged = np.stack([self.evaluate(lam) for lam in mixtures])
        predicted = self.predict_scores(mixtures)
        out = {"mixtures": mixtures, "trained_scores": trained, "merged_scores": merged,
               "trained_utility": self.utility(trained), "merged_utility": self.utility(merged),
               "predicted_utility": self.utility(predicted)}
        out["spearman_merged"] = spearman(out["merged_utility"], out["trained_utility"])
        out["spearman_predicted"] = spearman(out["predicted_utility"], out["trained_utility"])
        out["spearman_per_capability"] = [spearman(merged[:, m], trained[:, m]) for m in range(merged.shape[1])]
        out["spearman_by_normalisation"] = {}
        for kind in NORMALISATIONS:
            normaliser = Normaliser(self.seed_scores, kind)
            out["spearman_by_normalisation"][kind] = spearman(utility(merged, normaliser, self.capability_weights),
                                                              utility(trained, normaliser, self.capability_weights))
        self.log(f"validation: {len(mixtures)} mixtures trained ({time.perf_counter() - start:.0f}s); "
                 f"Spearman rho merged-proxy vs trained {out['spearman_merged']:.3f}, "
                 f"surrogate vs trained {out['spearman_predicted']:.3f}")
        return out
