"""BOOM's training data: seeded subsets of one or more retrieval datasets (arXiv 2602.05787).

Each sub-model of a BOOM merge trains on ``sample_ratio`` of every dataset's training rows, drawn
per dataset without replacement (``bootstrap=True``: with replacement) from a seed of its own, so
every sub-model sees every dataset. Evaluation reads the primary dataset (this module's own
``source``/``path``) exactly as ``RetrievalDataModule`` does; ``mixture`` adds more training
datasets, each a dict of ``RetrievalDataModule`` arguments plus an optional ``ratio`` (default
``sample_ratio``). The incremental update is the same module: the new data as primary with ratio 1
and the historical datasets in ``mixture`` with ``ratio`` = the core ratio.

With several datasets, ``batch_shuffle=dataset`` is the paper's batch-level shuffling: every global
batch comes from one dataset and the order of the batches is shuffled; ``mixed`` shuffles rows.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from datamodules.retrieval import RetrievalDataModule, _Instances, collate_train

BATCH_SHUFFLES = ("dataset", "mixed")


def subset_size(total: int, ratio: float) -> int:
    """floor(ratio * total), robust to float error (0.29 * 100 is 28.999...)."""
    return math.floor(ratio * total + 1e-9)


def sample_subset(total: int, ratio: float, seed: int | str, bootstrap: bool = False) -> list[int]:
    """Indices of a seeded ``ratio`` sample of ``range(total)``, in ascending order; ratio 1 without
    bootstrap is every index."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"sampling ratio must lie in (0, 1], got {ratio}")
    size = subset_size(total, ratio)
    rng = random.Random(f"boom-subset:{seed}")
    if bootstrap:
        return sorted(rng.choices(range(total), k=size))
    if size == total:
        return list(range(total))
    return sorted(rng.sample(range(total), size))


class BatchLevelShuffleSampler(Sampler[list[int]]):
    """Batches of one dataset each, the batch order shuffled across datasets (a new order per epoch).

    ``sizes``: how many rows each dataset has; rows are numbered dataset after dataset. Each global
    batch holds ``batch_size * num_replicas`` rows of one dataset and rank ``rank`` reads its slice,
    so at every step all ranks read the same dataset (cross-device negatives stay in one dataset).
    Remainders smaller than a global batch are dropped.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0) -> None:
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        rng = random.Random(f"boom-bls:{self.seed}:{self.epoch}")
        span, start, batches = self.batch_size * self.num_replicas, 0, []
        for size in self.sizes:
            rows = list(range(start, start + size))
            rng.shuffle(rows)
            batches += [rows[i:i + span] for i in range(0, size - span + 1, span)]
            start += size
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        return sum(size // (self.batch_size * self.num_replicas) for size in self.sizes)


class BoomDataModule(RetrievalDataModule):
    """``RetrievalDataModule`` whose training rows are a seeded ``sample_ratio`` subset of each dataset.

    After ``setup``: ``full_rows[j]`` (every training row of dataset j), ``subset_indices[j]`` (the
    sampled positions into it) and ``train_rows`` (the training set, dataset after dataset).
    """

    def __init__(self, sample_ratio: float = 1.0, sample_seed: int = 0, bootstrap: bool = False,
                 mixture: list[dict] | None = None, batch_shuffle: str = "dataset", **base: Any) -> None:
        super().__init__(**base)
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"data.sample_ratio must lie in (0, 1], got {sample_ratio}")
        if batch_shuffle not in BATCH_SHUFFLES:
            raise ValueError(f"unknown data.batch_shuffle '{batch_shuffle}'; choose one of {', '.join(BATCH_SHUFFLES)}")
        for i, extra in enumerate(mixture or []):
            if not isinstance(extra, dict) or "source" not in extra:
                raise ValueError(f"data.mixture[{i}] must be a dict of RetrievalDataModule arguments with a 'source'")
        self.full_rows: list[list[dict[str, Any]]] = []
        self.subset_indices: list[list[int]] = []
        self.dataset_names: list[str] = []

    def dataset_ratios(self) -> list[float]:
        hp = self.hparams
        return [hp.sample_ratio] + [float(extra.get("ratio", hp.sample_ratio)) for extra in hp.mixture or []]

    def _mixture_rows(self, extra: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        hp = self.hparams
        kwargs = {"group_size": hp.group_size, "batch_size": hp.batch_size, "seed": hp.seed,
                  **{k: v for k, v in extra.items() if k != "ratio"}}
        other = RetrievalDataModule(**kwargs)
        other.setup("fit")
        return other.data.name, other.train_rows

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        super().setup(stage)
        hp = self.hparams
        named = [(self.data.name, self.train_rows)] + [self._mixture_rows(extra) for extra in hp.mixture or []]
        self.dataset_names = [name for name, _ in named]
        self.full_rows = [rows for _, rows in named]
        # Each dataset draws from its own seed, so adding a dataset leaves the others' subsets unchanged.
        self.subset_indices = [sample_subset(len(rows), ratio, f"{hp.sample_seed}:{j}", hp.bootstrap)
                               for j, (rows, ratio) in enumerate(zip(self.full_rows, self.dataset_ratios()))]
        self.train_rows = [dict(rows[i], dataset=j) for j, (rows, picked) in
                           enumerate(zip(self.full_rows, self.subset_indices)) for i in picked]

    def subset_sizes(self) -> list[int]:
        return [len(picked) for picked in self.subset_indices]

    def train_dataloader(self) -> DataLoader:
        if len(self.full_rows) == 1 or self.hparams.batch_shuffle == "mixed":
            return super().train_dataloader()
        trainer = getattr(self, "trainer", None)
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = BatchLevelShuffleSampler(self.subset_sizes(), self.hparams.batch_size, seed=self.hparams.seed,
                                           num_replicas=replicas, rank=rank)
        return DataLoader(_Instances(self.train_rows), batch_sampler=sampler, collate_fn=collate_batch,
                          num_workers=self.hparams.num_workers)


def collate_batch(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``collate_train`` plus each row's dataset index."""
    return {**collate_train(rows), "dataset": torch.tensor([r.get("dataset", 0) for r in rows], dtype=torch.long)}
