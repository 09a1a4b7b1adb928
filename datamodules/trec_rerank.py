"""Reranking data: per query, first-stage candidates (ids, texts, in first-stage order) and qrels.

``source=file`` reads the TourRank/RankGPT candidate format (one query per line:
``{"query": str, "hits": [{"qid", "docid", "rank", "score", "content"}, ...]}``, e.g. TREC DL19
BM25 top-100) and a TREC qrels file. ``source=synthetic`` generates a small collection with a
fixed seed: topic-word queries, graded documents that share more topic words the more relevant
they are, and a noisy word-overlap first-stage order (the embedded default).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from datamodules.readers import DataFormatError, iter_jsonl, read_trec_qrels

SOURCES = ("file", "synthetic")


def read_candidates(path: str | Path, top_k: int | None = None) -> list[dict[str, Any]]:
    """Queries in file order: ``{qid, query, doc_ids, texts}``, candidates sorted by their ``rank``."""
    queries = []
    for line_no, obj in iter_jsonl(path):
        query, hits = obj.get("query"), obj.get("hits")
        if not isinstance(query, str):
            raise DataFormatError(path, line_no, "missing or non-string key 'query'")
        if not isinstance(hits, list) or not hits:
            raise DataFormatError(path, line_no, "key 'hits' must be a non-empty list")
        for i, hit in enumerate(hits):
            missing = [k for k in ("qid", "docid", "rank", "content") if not isinstance(hit, dict) or k not in hit]
            if missing:
                raise DataFormatError(path, line_no, f"hit {i} lacks {missing}")
        qids = {str(hit["qid"]) for hit in hits}
        if len(qids) != 1:
            raise DataFormatError(path, line_no, f"hits carry several qids {sorted(qids)}")
        hits = sorted(hits, key=lambda h: int(h["rank"]))[:top_k]
        queries.append({"qid": qids.pop(), "query": query, "doc_ids": [str(h["docid"]) for h in hits],
                        "texts": [str(h["content"]) for h in hits]})
    return queries


def generate_candidates(num_queries: int = 4, num_candidates: int = 20, vocab_size: int = 60,
                        seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """A generated reranking task: (queries as ``read_candidates`` returns them, qrels)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(vocab_size)]
    queries, qrels = [], {}
    for q in range(num_queries):
        qid = f"q{q}"
        topic = rng.sample(vocab, 4)
        docs = []
        for d in range(num_candidates):
            grade = rng.choices([0, 1, 2, 3], weights=[10, 4, 3, 2])[0]
            words = rng.sample(topic, min(grade + (rng.random() < 0.3), 4)) + rng.choices(vocab, k=rng.randint(6, 12))
            rng.shuffle(words)
            docs.append((f"{qid}d{d}", " ".join(words), grade))
        # First stage: topic-word overlap plus noise, like a weak lexical retriever.
        docs.sort(key=lambda doc: -(sum(w in topic for w in doc[1].split()) + rng.gauss(0, 1.0)))
        queries.append({"qid": qid, "query": " ".join(topic), "doc_ids": [d for d, _, _ in docs],
                        "texts": [t for _, t, _ in docs]})
        qrels[qid] = {d: g for d, _, g in docs}
    return queries, qrels


def collate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rows


class TrecRerankDataModule(L.LightningDataModule):
    """Test/predict only (zero-shot reranking). Batches are lists of query dicts with keys
    qid, query, doc_ids, texts (first-stage order) and qrels (that query's judgements)."""

    def __init__(self, source: str = "synthetic", path: str | None = None, qrels: str | None = None,
                 top_k: int = 100, max_queries: int | None = None, batch_size: int = 1,
                 synthetic: dict | None = None, seed: int = 0) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown data.source '{source}'; choose one of {', '.join(SOURCES)}")
        if source == "file" and not (path and qrels):
            raise ValueError("data.source=file needs data.path (candidate jsonl) and data.qrels (TREC qrels)")
        self.save_hyperparameters()
        self.rows: list[dict[str, Any]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.rows is not None:
            return
        hp = self.hparams
        if hp.source == "file":
            queries, qrels = read_candidates(hp.path, hp.top_k), read_trec_qrels(hp.qrels)
        else:
            queries, qrels = generate_candidates(**{"num_candidates": hp.top_k, "seed": hp.seed,
                                                    **(hp.synthetic or {})})
        short = [q["qid"] for q in queries if len(q["doc_ids"]) < hp.top_k]
        if short:
            raise ValueError(f"queries {short[:5]} have fewer than data.top_k={hp.top_k} candidates")
        self.rows = [{**q, "qrels": qrels.get(q["qid"], {})} for q in queries[:hp.max_queries]]

    def _loader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
