"""BOOM's orchestration: train sub-models on seeded subsets from one base, merge them; incremental updates.

    python -m zoo.boom.runner experiment=boom_scifact [key=value ...]

trains one sub-model per ``boom.ratios`` entry (config key ``boom``), merges them, tests the merged
model on the data config's held-apart queries and saves it (``save_pretrained``) under
``outputs/boom_runner/<time>/model``. ``python train.py model=boom`` trains a single sub-model.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from zoo.blocks.merging import MERGE_METHODS, merge
from zoo.boom.module import BoomModule

WEIGHT_SCHEMES = ("equal", "size_proportional")
MERGE_BASES = (None, "pretrained")


@dataclass(frozen=True)
class SubsetSpec:
    """One sub-model's data: the sampling ratio (in (0, 1]) and the subset seed."""

    ratio: float
    seed: int


@dataclass
class SubModel:
    spec: SubsetSpec
    state: dict[str, Tensor] = field(repr=False)
    steps: int
    examples: int


def plan(ratios: Sequence[float], seed: int = 0, seeds: Sequence[int] | None = None) -> list[SubsetSpec]:
    """One spec per ratio; sub-model m draws its subset from ``seeds[m]`` (default ``seed + m``)."""
    if not ratios:
        raise ValueError("boom.ratios is empty: give at least one sampling ratio")
    seeds = list(seeds) if seeds is not None else [seed + m for m in range(len(ratios))]
    if len(seeds) != len(ratios):
        raise ValueError(f"boom.seeds has {len(seeds)} entries for {len(ratios)} ratios")
    return [SubsetSpec(float(r), int(s)) for r, s in zip(ratios, seeds)]


def merge_weights(sizes: Sequence[float], scheme: str = "equal") -> list[float]:
    """Merge weights (normalised): equal, or proportional to each sub-model's training-set size."""
    if scheme == "equal":
        return [1.0 / len(sizes)] * len(sizes)
    if scheme == "size_proportional":
        total = float(sum(sizes))
        return [s / total for s in sizes]
    raise ValueError(f"unknown boom.merge_weights '{scheme}'; choose one of {', '.join(WEIGHT_SCHEMES)}")


def merge_states(states: Sequence[dict[str, Tensor]], weights: Sequence[float], method: str = "multislerp",
                 base: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Merge sub-model state dicts with ``zoo.blocks.merging``; ``base`` is the shared starting point
    (multislerp interpolates task vectors from it; task_arithmetic needs it)."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown boom.merge_method '{method}'; choose one of multislerp, linear, task_arithmetic")
    if method == "multislerp":
        # Tensors no sub-model changed (MiniLM's unused pooler, or every untouched tensor with a base) are
        # carried over bit for bit; Multi-SLERP would give them back only up to rounding.
        same = [k for k, v in states[0].items() if all(torch.equal(v, s[k]) for s in states[1:])
                and (base is None or torch.equal(v, base[k]))]
        rest = [k for k in states[0] if k not in set(same)]
        merged = merge("multislerp", [{k: s[k] for k in rest} for s in states], weights,
                       base=None if base is None else {k: base[k] for k in rest}) if rest else {}
        return {k: states[0][k].clone() if k in same else merged[k] for k in states[0]}
    if method == "linear":
        return merge("linear", list(states), weights)
    if method == "task_arithmetic":
        if base is None:
            raise ValueError("boom.merge_method=task_arithmetic needs boom.merge_base=pretrained")
        return merge("task_arithmetic", base, list(states), weights)
    raise ValueError(f"boom.merge_method '{method}' is not a many-model merge; "
                     "use multislerp, linear or task_arithmetic")


def _instantiate(config: dict[str, Any], **extra: Any) -> Any:
    from hydra.utils import instantiate
    return instantiate(copy.deepcopy(config), _convert_="all", **extra)


class BoomRunner:
    """Trains one ``BoomModule`` per subset spec from identical base weights and merges them.

    ``model`` and ``data`` are the composed model and data configs (dicts with ``_target_``; the data
    target must accept ``sample_ratio`` and ``sample_seed``: ``BoomDataModule``); ``trainer`` holds
    ``lightning.Trainer`` keyword arguments (``max_epochs``, ``max_steps``, ...). ``seed`` seeds every
    sub-model's training alike (shuffling, dropout), so sub-models differ only in their data.
    """

    def __init__(self, model: dict[str, Any], data: dict[str, Any], trainer: dict[str, Any] | None = None,
                 ratios: Sequence[float] = (0.5, 1.0), seeds: Sequence[int] | None = None, seed: int = 0,
                 merge_method: str = "multislerp", merge_weights: str = "equal", merge_base: str | None = None,
                 root: str | Path | None = None) -> None:
        if merge_weights not in WEIGHT_SCHEMES:
            raise ValueError(f"unknown boom.merge_weights '{merge_weights}'; choose one of {', '.join(WEIGHT_SCHEMES)}")
        if merge_base not in MERGE_BASES:
            raise ValueError(f"unknown boom.merge_base '{merge_base}'; choose null or pretrained")
        self.model_config, self.data_config = dict(model), dict(data)
        self.trainer_kwargs = dict(trainer or {})
        self.specs = plan(ratios, seed=seed, seeds=seeds)
        self.seed, self.merge_method = seed, merge_method
        self.weight_scheme, self.merge_base = merge_weights, merge_base
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="boom-"))
        self._base_state: dict[str, Tensor] | None = None

    # -- parts -----------------------------------------------------------------------------
    def build_module(self, **extra: Any) -> BoomModule:
        module = _instantiate(self.model_config, **extra)
        if not isinstance(module, BoomModule):
            raise TypeError(f"model._target_ builds {type(module).__name__}; BOOM needs a zoo.boom BoomModule")
        return module

    def base_state(self) -> dict[str, Tensor]:
        """The weights every sub-model starts from (built once, so all start identical)."""
        if self._base_state is None:
            self._base_state = {k: v.detach().clone() for k, v in self.build_module().state_dict().items()}
        return self._base_state

    def build_datamodule(self, spec: SubsetSpec, data: dict[str, Any] | None = None) -> L.LightningDataModule:
        return _instantiate({**(data or self.data_config), "sample_ratio": spec.ratio, "sample_seed": spec.seed})

    def build_trainer(self, folder: Path) -> L.Trainer:
        kwargs = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, **self.trainer_kwargs}
        return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=str(folder), **kwargs)

    # -- the method ------------------------------------------------------------------------
    def train(self, spec: SubsetSpec, init: dict[str, Tensor] | None = None,
              data: dict[str, Any] | None = None) -> SubModel:
        """Fit one sub-model on ``spec``'s subset, starting from ``init`` (default: the base weights)."""
        datamodule = self.build_datamodule(spec, data)
        module = self.build_module()
        module.load_state_dict(init if init is not None else self.base_state())
        L.seed_everything(self.seed, workers=True)
        trainer = self.build_trainer(self.root / f"sub-{spec.ratio:g}-seed{spec.seed}")
        trainer.fit(module, datamodule=datamodule)
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return SubModel(spec, state, steps=int(trainer.global_step), examples=len(datamodule.train_rows))

    def merge(self, sub_models: Sequence[SubModel]) -> dict[str, Tensor]:
        weights = merge_weights([s.examples for s in sub_models], self.weight_scheme)
        base = self.base_state() if self.merge_base == "pretrained" else None
        return merge_states([s.state for s in sub_models], weights, self.merge_method, base)

    def merged_module(self, sub_models: Sequence[SubModel], state: dict[str, Tensor] | None = None) -> BoomModule:
        """A module holding the merge of ``sub_models``, with its provenance in its hyperparameters."""
        weights = merge_weights([s.examples for s in sub_models], self.weight_scheme)
        provenance = {
            "merge_method": self.merge_method, "merge_base": self.merge_base, "merge_weights": weights,
            "sub_models": [{**asdict(s.spec), "steps": s.steps, "examples": s.examples} for s in sub_models],
            "training_steps": sum(s.steps for s in sub_models),
        }
        module = self.build_module(provenance=provenance)
        module.load_state_dict(state if state is not None else self.merge(sub_models))
        return module.eval()

    def run(self) -> tuple[BoomModule, list[SubModel]]:
        sub_models = [self.train(spec) for spec in self.specs]
        return self.merged_module(sub_models), sub_models

    def evaluate(self, module: BoomModule, data: dict[str, Any] | L.LightningDataModule | None = None
                 ) -> dict[str, float]:
        """Test metrics of ``module`` on a datamodule or data config (default: this runner's data config,
        whose held-apart queries are the in-domain test)."""
        datamodule = data if isinstance(data, L.LightningDataModule) else _instantiate(data or self.data_config)
        trainer = self.build_trainer(self.root / "eval")
        trainer.test(module, datamodule=datamodule)
        return dict(module.test_metrics)


def training_cost(sub_models: Sequence[SubModel], full_examples: int) -> dict[str, float]:
    """Steps and epochs-equivalent (examples seen over one full-data epoch) summed over sub-models."""
    return {"steps": sum(s.steps for s in sub_models),
            "epochs": sum(s.examples for s in sub_models) / max(full_examples, 1)}


class IncrementalUpdater:
    """BOOM's update protocol: train on new data ∪ a core subset of the history, merge with the old model.

    ``old``: the old model's state dict or saved folder; ``new_data``: the new dataset's data config
    (a ``BoomDataModule`` config; its held-apart queries are the new domain's evaluation);
    ``history``: ``RetrievalDataModule`` argument dicts of the datasets the old model was trained on.
    The update set is all of the new data plus ``core_ratio`` of every historical dataset; the update
    model starts from the base weights (``init=base``, the spec's choice) or the old model's
    (``init=old``); the result is the merge of exactly the old and the update model.
    """

    def __init__(self, runner: BoomRunner, old: dict[str, Tensor] | str | Path, new_data: dict[str, Any],
                 history: Sequence[dict[str, Any]], core_ratio: float = 0.4, init: str = "base",
                 old_weight: float = 0.5, core_seed: int = 0) -> None:
        if init not in ("base", "old"):
            raise ValueError(f"unknown incremental init '{init}'; choose base or old")
        if not 0.0 < core_ratio <= 1.0:
            raise ValueError(f"core_ratio must lie in (0, 1], got {core_ratio}")
        if isinstance(old, (str, Path)):
            old = BoomModule.from_pretrained(old).state_dict()
        self.runner, self.old_state, self.init = runner, dict(old), init
        self.core_ratio, self.old_weight, self.core_seed = core_ratio, old_weight, core_seed
        self.data = {**new_data, "mixture": [{**h, "ratio": core_ratio} for h in history]}

    def update_datamodule(self) -> L.LightningDataModule:
        return self.runner.build_datamodule(SubsetSpec(1.0, self.core_seed), self.data)

    def run(self) -> tuple[BoomModule, SubModel]:
        init = self.old_state if self.init == "old" else self.runner.base_state()
        update = self.runner.train(SubsetSpec(1.0, self.core_seed), init=init, data=self.data)
        weights = [self.old_weight, 1.0 - self.old_weight]
        base = self.runner.base_state() if self.runner.merge_base == "pretrained" else None
        state = merge_states([self.old_state, update.state], weights, self.runner.merge_method, base)
        module = self.runner.build_module(provenance={
            "incremental": True, "core_ratio": self.core_ratio, "init": self.init, "merge_weights": weights,
            "merge_method": self.runner.merge_method, "update_steps": update.steps, "update_examples": update.examples})
        module.load_state_dict(state)
        return module.eval(), update


def runner_from_config(cfg: Any, root: str | Path | None = None) -> BoomRunner:
    """A runner from a composed train.yaml config with a ``boom`` block (see configs/experiment/boom_scifact.yaml)."""
    from omegaconf import OmegaConf
    boom = OmegaConf.to_container(cfg.get("boom") or {}, resolve=True)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    keep = ("max_epochs", "max_steps", "limit_train_batches", "accumulate_grad_batches", "gradient_clip_val",
            "precision", "accelerator", "devices", "fast_dev_run")
    return BoomRunner(OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.data, resolve=True),
                      {k: trainer[k] for k in keep if k in trainer}, seed=int(cfg.seed), root=root, **boom)


def main(overrides: Sequence[str]) -> None:
    from hydra import compose, initialize_config_dir

    import train  # noqa: F401  (registers the zoo_root resolver)
    from zoo.paths import REPO_ROOT

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    folder = REPO_ROOT / "outputs" / "boom_runner" / _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    runner = runner_from_config(cfg, root=folder)
    module, sub_models = runner.run()
    metrics = runner.evaluate(module)
    full = runner.build_datamodule(SubsetSpec(1.0, 0))
    full.setup("fit")
    cost = training_cost(sub_models, len(full.train_rows))
    saved = module.save_pretrained(folder / "model", metrics=metrics, data=f"BOOM subsets of {cfg.data.get('path')}")
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics, "cost": cost}, indent=2))
    print(json.dumps({"metrics": metrics, "cost": cost}, indent=2))
    print(f"merged model saved to {saved}")


if __name__ == "__main__":
    main(sys.argv[1:])
