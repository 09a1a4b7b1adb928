"""Retrieval training and evaluation data from a generated collection, a BEIR folder or Cranfield.

Training instances: a query, K documents (the best-judged positive and the highest-ranked
BM25 negatives) and a teacher ranking of them (judged relevance, then BM25 score; E2Rank's
stand-in for the paper's Qwen3-32B permutations). Evaluation: the held-apart queries, the
corpus and (optionally) BM25 top-k candidates to rerank. Every bi-encoder of the zoo
(``zoo.dense``) reads it.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.readers import RetrievalData, read_beir, read_cranfield
from datamodules.synthetic import SyntheticSpec, generate
from zoo.blocks.bm25 import BM25Retriever

SOURCES = ("synthetic", "beir", "cranfield")
PROMPT_ORDERS = ("shuffle", "dataset")


class _Instances(Dataset):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def collate_train(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "query": [r["query"] for r in rows],
        "docs": [doc for r in rows for doc in r["docs"]],
        "order": torch.tensor([r["order"] for r in rows], dtype=torch.long),
        "positive": torch.tensor([r["positive"] for r in rows], dtype=torch.long),
    }


def collate_eval(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"qid": [r["qid"] for r in rows], "query": [r["query"] for r in rows]}


class RetrievalDataModule(L.LightningDataModule):
    """``source``: synthetic (generated), beir (a BEIR folder at ``path``) or cranfield.

    ``eval_fraction`` of the queries (a seeded split) is held apart from training and used
    for validation and test; 1.0 evaluates every query (zero-shot). ``first_stage``: bm25
    (rerank BM25 top-``first_stage_depth``) or dense (the model reranks its own retrieval).
    """

    def __init__(
        self,
        source: str = "synthetic",
        path: str | None = None,
        split: str = "train",
        eval_fraction: float = 0.2,
        group_size: int = 5,
        batch_size: int = 4,
        eval_batch_size: int = 32,
        prompt_order: str = "shuffle",
        first_stage: str = "bm25",
        first_stage_depth: int = 100,
        synthetic: dict | None = None,
        max_queries: int | None = None,
        corpus_limit: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown data source '{source}'; choose one of {', '.join(SOURCES)}")
        if prompt_order not in PROMPT_ORDERS:
            raise ValueError(f"unknown prompt_order '{prompt_order}'; choose one of {', '.join(PROMPT_ORDERS)}")
        if first_stage not in ("bm25", "dense"):
            raise ValueError(f"unknown first_stage '{first_stage}'; choose bm25 or dense")
        if source != "synthetic" and not path:
            raise ValueError(f"data source '{source}' needs data.path (a folder)")
        self.save_hyperparameters()
        self.data: RetrievalData | None = None
        self.train_rows: list[dict[str, Any]] = []
        self.eval_qids: list[str] = []
        self.bm25_run: dict[str, dict[str, float]] = {}

    # -- loading -------------------------------------------------------------------------
    def load(self) -> RetrievalData:
        hp = self.hparams
        if hp.source == "synthetic":
            data, _ = generate(SyntheticSpec(**(hp.synthetic or {})))
        elif hp.source == "beir":
            data = read_beir(Path(hp.path), split=hp.split)
        else:
            data = read_cranfield(Path(hp.path))
        return data

    def _split(self, data: RetrievalData) -> tuple[list[str], list[str]]:
        qids = sorted(q for q in data.queries if q in data.qrels)
        random.Random(self.hparams.seed).shuffle(qids)
        if self.hparams.max_queries:
            qids = qids[: self.hparams.max_queries]
        n_eval = round(len(qids) * self.hparams.eval_fraction)
        return qids[n_eval:], qids[:n_eval]

    def _limit_corpus(self, data: RetrievalData, qids: list[str]) -> RetrievalData:
        """Judged documents of the kept queries plus the first ``corpus_limit`` others (quick tests)."""
        judged = {d for q in qids for d in data.qrels.get(q, {})}
        keep = judged | set([d for d in data.corpus if d not in judged][: self.hparams.corpus_limit])
        corpus = {d: text for d, text in data.corpus.items() if d in keep}
        qrels = {q: {d: r for d, r in rels.items() if d in corpus} for q, rels in data.qrels.items()}
        return RetrievalData(corpus=corpus, queries=data.queries, qrels=qrels, name=data.name)

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        hp = self.hparams
        data = self.load()
        train_qids, self.eval_qids = self._split(data)
        if hp.corpus_limit:
            data = self._limit_corpus(data, train_qids + self.eval_qids)
        self.data = data
        doc_ids = list(data.corpus)
        bm25 = BM25Retriever().index(doc_ids, [data.doc_text(d) for d in doc_ids])
        wanted = train_qids + self.eval_qids
        self.bm25_run = bm25.search({q: data.queries[q] for q in wanted}, k=hp.first_stage_depth)
        self.train_rows = [row for q in train_qids if (row := self.instance(q)) is not None]

    def instance(self, qid: str) -> dict[str, Any] | None:
        """One training instance, or None when the query lacks a positive or enough negatives."""
        data, group = self.data, self.hparams.group_size
        rels = data.qrels.get(qid, {})
        if not rels or max(rels.values()) <= 0:
            return None
        positive = max(sorted(rels), key=rels.get)
        candidates = sorted(self.bm25_run.get(qid, {}).items(), key=lambda kv: -kv[1])
        negatives = [d for d, _ in candidates if rels.get(d, 0) < rels[positive]][: group - 1]
        if len(negatives) < group - 1:
            return None
        docs = [positive] + negatives
        score = {d: s for d, s in candidates}
        teacher = sorted(docs, key=lambda d: (-rels.get(d, 0), -score.get(d, 0.0), d))
        if self.hparams.prompt_order == "shuffle":
            random.Random(f"{self.hparams.seed}:{qid}").shuffle(docs)
        return {
            "query": data.queries[qid],
            "docs": [data.doc_text(d) for d in docs],
            "order": [docs.index(d) for d in teacher],
            "positive": docs.index(positive),
        }

    # -- what the module asks for during evaluation ------------------------------------------
    def retrieval_data(self, stage: str) -> RetrievalData:
        return self.data.subset(self.eval_qids)

    def first_stage_run(self, stage: str) -> dict[str, dict[str, float]] | None:
        if self.hparams.first_stage == "dense":
            return None
        return {q: self.bm25_run.get(q, {}) for q in self.eval_qids}

    # -- loaders -------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        if not self.train_rows:
            raise ValueError(
                f"data source '{self.hparams.source}' gives no training queries here "
                f"(eval_fraction={self.hparams.eval_fraction}); it is for evaluation: run with mode=test")
        return DataLoader(_Instances(self.train_rows), batch_size=self.hparams.batch_size, shuffle=True,
                          collate_fn=collate_train, num_workers=self.hparams.num_workers, drop_last=True)

    def _eval_loader(self) -> DataLoader:
        rows = [{"qid": q, "query": self.data.queries[q]} for q in self.eval_qids]
        return DataLoader(_Instances(rows), batch_size=self.hparams.eval_batch_size, shuffle=False,
                          collate_fn=collate_eval, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()
