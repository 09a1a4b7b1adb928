"""LLM-QL Stage-1 data: (query, positive passage) pairs with word-corrupted passages.

The pairs come from ``RetrievalDataModule``'s seeded query split (generated collection, BEIR or
Cranfield): training pairs from the training queries, evaluation pairs (clean) from the
held-apart ones, whose BM25 candidates the QL ranker reranks at test time.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.retrieval import RetrievalDataModule
from zoo.llm_ql.corruption import PLACEHOLDER, corrupt_words


class CorruptedPairs(Dataset):
    """Each access draws one positive and a fresh corruption from a generator seeded by
    (seed, item, how often the item was drawn), so a seed fixes every epoch's corruption."""

    def __init__(self, pairs: list[tuple[str, list[str]]], mask_prob: float, placeholder: str, seed: int) -> None:
        self.pairs, self.mask_prob, self.placeholder, self.seed = pairs, mask_prob, placeholder, seed
        self.draws: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, str]:
        rng = random.Random(f"{self.seed}:{i}:{self.draws[i]}")
        self.draws[i] += 1
        query, positives = self.pairs[i]
        doc = positives[0] if len(positives) == 1 else rng.choice(positives)
        return {"query": query, "doc": corrupt_words(doc, self.mask_prob, rng, self.placeholder)}


def _collate(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [r[key] for r in rows] for key in rows[0]}


class QLPairsDataModule(RetrievalDataModule):
    """``mask_prob``: the probability that a training passage word becomes ``placeholder``."""

    def __init__(self, mask_prob: float = 0.6, placeholder: str = PLACEHOLDER, **base: Any) -> None:
        super().__init__(**base)
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"data.mask_prob must lie in [0, 1], got {mask_prob}")
        self.save_hyperparameters()
        self.pairs: list[tuple[str, list[str]]] = []

    def positives(self, qid: str) -> list[str]:
        """Texts of the query's best-judged documents (sorted ids, so the order is fixed)."""
        rels = self.data.qrels.get(qid, {})
        best = max(rels.values(), default=0)
        return [self.data.doc_text(d) for d in sorted(rels) if best > 0 and rels[d] == best]

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        super().setup(stage)
        train_qids, _ = self._split(self.data)
        self.pairs = [(self.data.queries[q], docs) for q in train_qids if (docs := self.positives(q))]

    def train_dataloader(self) -> DataLoader:
        if not self.pairs:
            raise ValueError(f"data source '{self.hparams.source}' gives no training pairs here "
                             f"(eval_fraction={self.hparams.eval_fraction})")
        pairs = CorruptedPairs(self.pairs, self.hparams.mask_prob, self.hparams.placeholder, self.hparams.seed)
        return DataLoader(pairs, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=_collate,
                          num_workers=self.hparams.num_workers, drop_last=True,
                          generator=torch.Generator().manual_seed(self.hparams.seed))

    def _eval_loader(self) -> DataLoader:
        rows = [{"qid": q, "query": self.data.queries[q], "doc": docs[0]}
                for q in self.eval_qids if (docs := self.positives(q))]
        return DataLoader(rows, batch_size=self.hparams.eval_batch_size, shuffle=False, collate_fn=_collate,
                          num_workers=self.hparams.num_workers)
