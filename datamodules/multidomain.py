"""Several reasoning tasks mixed in one RL prompt stream, each sample tagged with its domain.

Every domain is a task of ``datamodules.reasoning``'s registry with its own options and its own
correctness reward. A sample is the task's dict plus ``domain`` (the domain's name) and
``reward`` (``{"name": ..., **options}``, what the ``domain`` reward below applies), so a
policy-gradient module configured with ``rewards: [{name: domain}]`` scores every sample with
its own task's checker, and MGS groups gradients by ``domain``.

Mixing: ``sampled`` draws each prompt's domain by weight (the reference's weighted sampler; a
batch may hold one domain only); ``balanced`` fills every batch in proportion to the weights.
Evaluation holds ``eval_size`` prompts per domain, in domain order.
"""
from __future__ import annotations

import random
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from datamodules.reasoning import TASKS, Sample
from zoo.blocks.rl.rewards import get_reward

MIXING = ("sampled", "balanced")
DEFAULT_DOMAINS = {
    "arithmetic": {"task": "arithmetic", "task_options": {"low": 0, "high": 29, "max_filler": 2},
                   "reward": {"name": "boxed_match"}, "weight": 1.0},
    "countdown": {"task": "countdown", "task_options": {"min_numbers": 3, "max_numbers": 3, "max_value": 9,
                                                        "max_target": 99, "style": "compact"},
                  "reward": {"name": "countdown"}, "weight": 1.0},
}


class MultiDomainDataModule(L.LightningDataModule):
    """Prompt batches mixing the ``domains`` (name -> task, task_options, reward, weight)."""

    def __init__(self, domains: dict[str, dict[str, Any]] | None = None, batch_size: int = 16,
                 train_batches: int = 100, eval_size: int = 64, eval_batch_size: int = 64, eval_split: str = "test",
                 mixing: str = "sampled", seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        if mixing not in MIXING:
            raise ValueError(f"unknown mixing '{mixing}'; choose one of {', '.join(MIXING)}")
        specs = dict(domains or DEFAULT_DOMAINS)
        if len(specs) < 1:
            raise ValueError("MultiDomainDataModule needs at least one domain")
        self.tasks, self.rewards, self.weights = {}, {}, {}
        for name, spec in specs.items():
            task = spec.get("task")
            if task not in TASKS:
                raise ValueError(f"domain '{name}': unknown reasoning task '{task}'; "
                                 f"registered: {', '.join(sorted(TASKS))}")
            reward = dict(spec.get("reward") or {})
            if "name" not in reward:
                raise ValueError(f"domain '{name}' needs reward.name (the task's correctness reward)")
            get_reward(reward["name"])
            weight = float(spec.get("weight", 1.0))
            if weight <= 0:
                raise ValueError(f"domain '{name}': weight must be > 0, got {weight}")
            self.tasks[name] = TASKS[task](**dict(spec.get("task_options") or {}))
            self.rewards[name], self.weights[name] = reward, weight

    @property
    def domains(self) -> list[str]:
        return list(self.tasks)

    def _tag(self, name: str, rows: list[Sample]) -> list[Sample]:
        return [{**row, "domain": name, "reward": dict(self.rewards[name])} for row in rows]

    def _domain_sequence(self, count: int, rng: random.Random) -> list[str]:
        names, weights = self.domains, [self.weights[n] for n in self.domains]
        if self.hparams.mixing == "sampled":
            return rng.choices(names, weights=weights, k=count)
        size = self.hparams.batch_size
        total = sum(weights)
        per_batch: list[str] = []
        for name, weight in zip(names, weights):
            per_batch += [name] * round(size * weight / total)
        per_batch = (per_batch + names * size)[:size]            # rounding: top up, then cut to the batch size
        out: list[str] = []
        while len(out) < count:
            batch = list(per_batch)
            rng.shuffle(batch)
            out += batch
        return out[:count]

    def _mixed(self, count: int, seed: int) -> list[Sample]:
        sequence = self._domain_sequence(count, random.Random(seed))
        pools = {name: iter(self._tag(name, self.tasks[name].samples("train", sequence.count(name) or 1, seed)))
                 for name in self.domains}
        return [next(pools[name]) for name in sequence]

    def train_samples(self) -> list[Sample]:
        return self._mixed(self.hparams.batch_size * self.hparams.train_batches, self.hparams.seed)

    def demonstrations(self, count: int, seed: int) -> list[Sample]:
        """Mixed samples with reference solutions for a supervised warm start (another stream than training)."""
        return self._mixed(count, seed + 7919)

    def eval_samples(self, domain: str | None = None) -> list[Sample]:
        names = [domain] if domain else self.domains
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise KeyError(f"unknown domain '{unknown[0]}'; domains: {', '.join(self.domains)}")
        return [row for name in names for row in
                self._tag(name, self.tasks[name].samples(self.hparams.eval_split, self.hparams.eval_size,
                                                         self.hparams.seed))]

    def _loader(self, rows: list[Sample], batch_size: int) -> DataLoader:
        return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=list,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples(), self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_samples(), self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_samples(), self.hparams.eval_batch_size)
