"""Multi-positive retrieval groups with labels from human qrels, LLM annotations or a mixture.

Each training group: the query's labelled positives first (a seeded subset when more than
``group_size``), then its highest-ranked BM25 documents that are not labelled positive; ``labels``
(B x G multi-hot) marks the positives. Label sources:

- ``human``: every document with a positive qrel;
- ``llm_relevance`` / ``llm_utility_selection`` / ``llm_utility_ranking``: an annotation JSONL from
  ``zoo.utility_annotation.annotator`` (``annotations``; with none, the deterministic mock annotator
  labels each query's candidate pool during setup, configured by ``mock_annotator``); ranking keeps the
  top ``ranking_top_m``. Queries without an LLM positive are dropped;
- ``mixture``: a seeded ``round(human_fraction * |Q|)`` of the training queries human-labelled, the rest
  ``mixture_llm_source``; ``schedule=curriculum`` serves every LLM-labelled query before every human one
  (each part shuffled once by seed), ``shuffled`` mixes them.

``corrupt_fraction`` c adds false positives (the top BM25 documents not labelled positive) so that
exactly round(c / (1 - c) * N) of the N + those labelled positives are wrong, spread over the
queries in a seeded order (with c = 0.5 every query with one positive gets one false one).
"""
from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import DataLoader

from datamodules.retrieval import RetrievalDataModule, _Instances, collate_train

LLM_SOURCES = ("llm_relevance", "llm_utility_selection", "llm_utility_ranking")
LABEL_SOURCES = ("human", *LLM_SOURCES, "mixture")
SCHEDULES = ("curriculum", "shuffled")
_ANNOTATION_FIELD = {"llm_relevance": "relevance_ids", "llm_utility_selection": "utility_ids",
                     "llm_utility_ranking": "utility_ranking"}


def collate_multi_positive(rows: list[dict[str, Any]]) -> dict[str, Any]:
    batch = collate_train(rows)
    batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.float)
    batch["qid"] = [r["qid"] for r in rows]
    return batch


class UtilityAnnotationDataModule(RetrievalDataModule):
    def __init__(
        self,
        label_source: str = "human",
        annotations: str | None = None,
        mock_annotator: dict | None = None,
        candidate_pool: int = 20,
        ranking_top_m: int = 3,
        human_fraction: float = 0.2,
        mixture_llm_source: str = "llm_utility_selection",
        schedule: str = "curriculum",
        corrupt_fraction: float = 0.0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if label_source not in LABEL_SOURCES:
            raise ValueError(f"unknown label_source '{label_source}'; choose one of {', '.join(LABEL_SOURCES)}")
        if mixture_llm_source not in LLM_SOURCES:
            raise ValueError(f"unknown mixture_llm_source '{mixture_llm_source}'; choose one of {LLM_SOURCES}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= corrupt_fraction < 1.0:
            raise ValueError(f"corrupt_fraction must be in [0, 1), got {corrupt_fraction}")
        if not 0.0 <= human_fraction <= 1.0:
            raise ValueError(f"human_fraction must be in [0, 1], got {human_fraction}")
        self.positives: dict[str, list[str]] = {}
        self.origin: dict[str, str] = {}
        self.false_positives: dict[str, list[str]] = {}
        self.annotation_records: dict[str, dict[str, Any]] = {}
        self._labels_ready = False

    # -- labels --------------------------------------------------------------------------
    def candidate_pool(self, qid: str) -> tuple[list[str], list[str]]:
        """The query's human positives plus top BM25 documents (``candidate_pool`` in all), shuffled by seed:
        (doc ids, texts) as shown to the annotator."""
        rels = self.data.qrels.get(qid, {})
        pool = [d for d in sorted(rels) if rels[d] > 0][: self.hparams.candidate_pool]
        ranked = sorted(self.bm25_run.get(qid, {}).items(), key=lambda kv: -kv[1])
        pool += [d for d, _ in ranked if d not in pool][: self.hparams.candidate_pool - len(pool)]
        random.Random(f"{self.hparams.seed}:pool:{qid}").shuffle(pool)
        return pool, [self.data.doc_text(d) for d in pool]

    def _llm_records(self, qids: list[str]) -> dict[str, dict[str, Any]]:
        from zoo.utility_annotation.annotator import (
            Candidates,
            MockBackend,
            UtilityAnnotator,
            read_annotations,
        )

        if self.hparams.annotations:
            return read_annotations(self.hparams.annotations)
        annotator = UtilityAnnotator(MockBackend(**(self.hparams.mock_annotator or {})))
        items = [Candidates(q, self.data.queries[q], *self.candidate_pool(q)) for q in qids]
        return {r["query_id"]: r for r in annotator.run(items)}

    def _llm_positives(self, source: str, qid: str) -> list[str]:
        record = self.annotation_records.get(qid)
        if record is None:
            return []
        ids = [str(d) for d in record.get(_ANNOTATION_FIELD[source]) or []]
        if source == "llm_utility_ranking":
            ids = ids[: self.hparams.ranking_top_m]
        return [d for d in ids if d in self.data.corpus]

    def assign_labels(self, train_qids: list[str]) -> None:
        hp = self.hparams
        human_qids: set[str] = set()
        if hp.label_source == "human":
            human_qids = set(train_qids)
        elif hp.label_source == "mixture":
            shuffled = sorted(train_qids)
            random.Random(f"{hp.seed}:mixture").shuffle(shuffled)
            human_qids = set(shuffled[: round(hp.human_fraction * len(shuffled))])
        llm_source = hp.label_source if hp.label_source in LLM_SOURCES else hp.mixture_llm_source
        llm_qids = [q for q in train_qids if q not in human_qids]
        if llm_qids:
            self.annotation_records = self._llm_records(llm_qids)
        for qid in train_qids:
            if qid in human_qids:
                rels = self.data.qrels.get(qid, {})
                self.positives[qid] = [d for d in sorted(rels) if rels[d] > 0]
                self.origin[qid] = "human"
            else:
                self.positives[qid] = self._llm_positives(llm_source, qid)
                self.origin[qid] = "llm"
        self.corrupt(train_qids)

    def corrupt(self, train_qids: list[str]) -> None:
        """Label the top BM25 non-positives of seeded queries positive, round(c/(1-c)·N) in all."""
        c = self.hparams.corrupt_fraction
        labelled = [q for q in train_qids if self.positives.get(q)]
        n_false = round(c / (1.0 - c) * sum(len(self.positives[q]) for q in labelled))
        order = sorted(labelled)
        random.Random(f"{self.hparams.seed}:corrupt").shuffle(order)
        pools = {q: [d for d, _ in sorted(self.bm25_run.get(q, {}).items(), key=lambda kv: -kv[1])
                     if d not in self.positives[q] and self.data.qrels.get(q, {}).get(d, 0) <= 0] for q in order}
        while n_false > 0 and any(pools.values()):
            for qid in order:
                if n_false == 0:
                    break
                if pools[qid]:
                    wrong = pools[qid].pop(0)
                    self.positives[qid].append(wrong)
                    self.false_positives.setdefault(qid, []).append(wrong)
                    n_false -= 1

    # -- groups --------------------------------------------------------------------------
    def instance(self, qid: str) -> dict[str, Any] | None:
        """Positives first, then BM25 negatives; None without a positive or enough negatives."""
        if not self._labels_ready:
            return None
        group = self.hparams.group_size
        positives = list(self.positives.get(qid, []))
        if not positives:
            return None
        rng = random.Random(f"{self.hparams.seed}:group:{qid}")
        if len(positives) > group:
            positives = rng.sample(positives, group)
        ranked = sorted(self.bm25_run.get(qid, {}).items(), key=lambda kv: -kv[1])
        labelled = set(self.positives[qid])
        negatives = [d for d, _ in ranked if d not in labelled][: group - len(positives)]
        if len(positives) + len(negatives) < group:
            return None
        docs = positives + negatives
        return {
            "qid": qid,
            "query": self.data.queries[qid],
            "docs": [self.data.doc_text(d) for d in docs],
            "doc_ids": docs,
            "labels": [1] * len(positives) + [0] * len(negatives),
            "positive": 0,
            "order": list(range(group)),
            "origin": self.origin.get(qid, "human"),
        }

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        hp = self.hparams
        super().setup(stage)  # data and BM25; no rows yet, ``instance`` waits for the labels
        self._labels_ready = True
        train_qids, _ = self._split(self.data)
        self.assign_labels(train_qids)
        rows = [row for q in train_qids if (row := self.instance(q)) is not None]
        if hp.label_source == "mixture" and hp.schedule == "curriculum":
            rng = random.Random(f"{hp.seed}:curriculum")
            llm = [r for r in rows if r["origin"] == "llm"]
            human = [r for r in rows if r["origin"] == "human"]
            rng.shuffle(llm)
            rng.shuffle(human)
            rows = llm + human
        self.train_rows = rows

    def train_dataloader(self) -> DataLoader:
        if not self.train_rows:
            raise ValueError(f"label_source '{self.hparams.label_source}' gives no training query with a positive "
                             f"and {self.hparams.group_size - 1} negatives here")
        curriculum = self.hparams.label_source == "mixture" and self.hparams.schedule == "curriculum"
        return DataLoader(_Instances(self.train_rows), batch_size=self.hparams.batch_size, shuffle=not curriculum,
                          collate_fn=collate_multi_positive, num_workers=self.hparams.num_workers, drop_last=True)
