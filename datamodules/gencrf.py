"""GenCRF data: query batches over a retrieval collection, and QERM training rows.

``GenCRFDataModule``: a generated mini-BEIR (the embedded default: 10 topics, 300 documents, 60
queries of 3-4 words, 20 held apart) or a BEIR folder. A seeded ``eval_fraction`` of the judged
queries is held apart for test (SciFact: 20% of the train-split queries, seed 0 -> 162, the same
split as datamodules/retrieval.py); the rest are training queries for the QERM labels.

``QERMDataModule``: (query, Q_final, label) rows. ``source=jsonl`` reads a file of GenCRF
predict rows (``{"query", "finals", "ndcg@10"}`` per line); ``source=generate`` runs GenCRF round 1
on the training queries of a ``GenCRFDataModule`` to produce them. Labels y = 1[nDCG@10 >= tau],
tau = the median by default (logged).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.readers import DataFormatError, RetrievalData, iter_jsonl, read_beir
from datamodules.synthetic import SyntheticSpec, generate
from zoo.gencrf.aggregation import median, qerm_labels

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "beir")
# 2 super-topics x 5 topics = 10 topics, 30 documents each, 6 queries per topic.
MINI_BEIR = {"super_topics": 2, "topics_per_super": 5, "docs_per_topic": 30, "queries_per_topic": 6}


def collate_queries(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"qid": [r["qid"] for r in rows], "query": [r["query"] for r in rows]}


def collate_qerm(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"query": [r["query"] for r in rows], "finals": [r["finals"] for r in rows],
            "label": torch.tensor([r["label"] for r in rows], dtype=torch.float32)}


class GenCRFDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: str = "synthetic",
        path: str | None = None,
        split: str = "train",
        eval_fraction: float = 1 / 3,
        max_eval_queries: int | None = None,
        synthetic: dict | None = None,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown data.source '{source}'; choose one of {', '.join(SOURCES)}")
        if source == "beir" and not path:
            raise ValueError("data.source=beir needs data.path (a BEIR folder)")
        if not 0.0 < eval_fraction <= 1.0:
            raise ValueError(f"data.eval_fraction must be in (0, 1], got {eval_fraction}")
        self.save_hyperparameters()
        self.data: RetrievalData | None = None
        self.train_qids: list[str] = []
        self.eval_qids: list[str] = []

    def load(self) -> RetrievalData:
        if self.hparams.source == "synthetic":
            return generate(SyntheticSpec(**{**MINI_BEIR, **(self.hparams.synthetic or {})}))[0]
        return read_beir(Path(self.hparams.path), split=self.hparams.split)

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data = self.load()
        qids = sorted(q for q in data.queries if q in data.qrels)
        random.Random(self.hparams.seed).shuffle(qids)
        n_eval = round(len(qids) * self.hparams.eval_fraction)
        self.train_qids, self.eval_qids = qids[n_eval:], qids[:n_eval][:self.hparams.max_eval_queries]
        self.data = data

    def retrieval_data(self, stage: str) -> RetrievalData:
        """The corpus with the queries of ``stage`` (train: QERM labelling; else the held-apart ones)."""
        self.setup()
        return self.data.subset(self.train_qids if stage == "train" else self.eval_qids)

    def query_loader(self, qids: list[str]) -> DataLoader:
        rows = [{"qid": q, "query": self.data.queries[q]} for q in qids]
        return DataLoader(rows, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate_queries)

    def test_dataloader(self) -> DataLoader:
        return self.query_loader(self.eval_qids)

    def predict_dataloader(self) -> DataLoader:
        return self.query_loader(self.eval_qids)


def read_qerm_rows(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line_no, obj in iter_jsonl(path):
        if not isinstance(obj.get("query"), str) or not isinstance(obj.get("finals"), list):
            raise DataFormatError(path, line_no, "a QERM row needs 'query' (string) and 'finals' (list of strings)")
        if not isinstance(obj.get("ndcg@10"), (int, float)):
            raise DataFormatError(path, line_no, "a QERM row needs a numeric 'ndcg@10'")
        rows.append({"query": obj["query"], "finals": [str(f) for f in obj["finals"]], "ndcg@10": float(obj["ndcg@10"])})
    return rows


def generate_qerm_rows(gencrf: dict, data: dict, batch_size: int = 8) -> list[dict[str, Any]]:
    """Round-1 GenCRF outputs and nDCG@10 for the training queries (the offline labelling run)."""
    from zoo.gencrf.module import GenCRFModule

    datamodule = GenCRFDataModule(**data)
    datamodule.setup()
    module = GenCRFModule(**gencrf).eval()
    module.prepare_index(datamodule.retrieval_data("train"))
    main = "scoredw_ft" if module.hparams.mode in ("scoredw_ft_qerm", "q_init") else module.hparams.mode
    rows = []
    with torch.no_grad():
        for start in range(0, len(datamodule.train_qids), batch_size):
            qids = datamodule.train_qids[start:start + batch_size]
            for row in module.run_round(qids, [datamodule.data.queries[q] for q in qids], 0, [main]):
                ndcg = module.ndcg(row["qid"], row["runs"][main])["ndcg@10"]
                if ndcg is not None:
                    rows.append({"qid": row["qid"], "query": row["query"], "finals": row["finals"], "ndcg@10": ndcg})
    return rows


class QERMDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: str = "generate",
        path: str | None = None,
        gencrf: dict | None = None,
        gencrf_data: dict | None = None,
        tau: float | str = "median",
        val_fraction: float = 0.25,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in ("generate", "jsonl"):
            raise ValueError(f"unknown data.source '{source}'; choose generate or jsonl")
        if source == "jsonl" and not path:
            raise ValueError("data.source=jsonl needs data.path (GenCRF predict rows)")
        if tau != "median" and not isinstance(tau, (int, float)):
            raise ValueError(f"data.tau must be 'median' or a number, got {tau!r}")
        self.save_hyperparameters()
        self.train_rows: list[dict[str, Any]] = []
        self.val_rows: list[dict[str, Any]] = []
        self.tau: float | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.tau is not None:
            return
        hp = self.hparams
        if hp.source == "jsonl":
            rows = read_qerm_rows(hp.path)
        else:
            rows = generate_qerm_rows(hp.gencrf or {}, hp.gencrf_data or {})
        if not rows:
            raise ValueError("QERM data: no rows with a judged relevant document")
        ndcgs = [r["ndcg@10"] for r in rows]
        self.tau = median(ndcgs) if hp.tau == "median" else float(hp.tau)
        for row, label in zip(rows, qerm_labels(ndcgs, self.tau)):
            row["label"] = label
        log.info("QERM labels: tau = %.4f, %d of %d positive", self.tau, sum(r["label"] for r in rows), len(rows))
        print(f"QERM labels: tau = {self.tau:.4f} ({sum(r['label'] for r in rows)} of {len(rows)} positive)")
        random.Random(hp.seed).shuffle(rows)
        n_val = round(len(rows) * hp.val_fraction)
        self.val_rows, self.train_rows = rows[:n_val], rows[n_val:]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_rows, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=collate_qerm)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_rows, batch_size=self.hparams.batch_size, collate_fn=collate_qerm)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
