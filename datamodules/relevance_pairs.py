"""(query, relevant passage, hard negative) triples for relevance patching (arXiv 2504.07898).

``source=synthetic`` generates the embedded default: 3-word queries, a relevant document holding
the query words among 9 filler words, a 12-word negative sharing none of them (both 12 words, so
no cutting is needed). ``source=file`` pairs, per TREC DL query, the best BM25-ranked passage with
qrel >= ``min_positive_grade`` and the best BM25-ranked judged non-relevant passage (qrel 0): a
hard negative. Token-level length equalisation and the check that clean and corrupted prompts
differ only inside the documents happen when the prompts are built
(``zoo.relevance_interp.prompts.build_pair``), where the tokenizer is known. Test/predict only.
"""
from __future__ import annotations

import random
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from datamodules.readers import read_trec_qrels
from datamodules.trec_rerank import collate, read_candidates

SOURCES = ("synthetic", "file")


def synthetic_triples(num_triples: int = 16, vocab_size: int = 60, query_words: int = 3, doc_words: int = 12,
                      seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(vocab_size)]
    rows = []
    for i in range(num_triples):
        query = rng.sample(vocab, query_words)
        rest = [w for w in vocab if w not in query]
        positive = query + rng.sample(rest, doc_words - query_words)
        rng.shuffle(positive)
        rows.append({"qid": f"s{i}", "query": " ".join(query), "positive": " ".join(positive),
                     "negative": " ".join(rng.sample(rest, doc_words))})
    return rows


def hard_negative_pairs(candidates: list[dict[str, Any]], qrels: dict[str, dict[str, int]],
                        min_positive_grade: int = 2, pairs_per_query: int = 1) -> list[dict[str, Any]]:
    """Per query, the top-ranked relevant and judged non-relevant candidates, paired in rank order."""
    rows = []
    for q in candidates:
        judged = qrels.get(q["qid"], {})
        ranked = list(zip(q["doc_ids"], q["texts"]))
        positives = [(d, t) for d, t in ranked if judged.get(d, -1) >= min_positive_grade]
        negatives = [(d, t) for d, t in ranked if judged.get(d, -1) == 0]
        for (pos_id, pos), (neg_id, neg) in list(zip(positives, negatives))[:pairs_per_query]:
            rows.append({"qid": q["qid"], "query": q["query"], "positive": pos, "negative": neg,
                         "positive_id": pos_id, "negative_id": neg_id})
    return rows


class RelevancePairsDataModule(L.LightningDataModule):
    """Batches are lists of dicts with qid, query, positive, negative."""

    def __init__(self, source: str = "synthetic", path: str | None = None, qrels: str | None = None,
                 min_positive_grade: int = 2, pairs_per_query: int = 1, max_pairs: int | None = None,
                 shuffle_seed: int | None = None, batch_size: int = 1, synthetic: dict | None = None,
                 seed: int = 0) -> None:
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
            rows = hard_negative_pairs(read_candidates(hp.path), read_trec_qrels(hp.qrels), hp.min_positive_grade,
                                       hp.pairs_per_query)
            if not rows:
                raise ValueError(f"{hp.qrels}: no query has both a passage with qrel >= {hp.min_positive_grade} "
                                 f"and a judged non-relevant one among the candidates of {hp.path}")
        else:
            rows = synthetic_triples(**{"seed": hp.seed, **(hp.synthetic or {})})
        if hp.shuffle_seed is not None:
            random.Random(hp.shuffle_seed).shuffle(rows)
        self.rows = rows[:hp.max_pairs]

    def _loader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
