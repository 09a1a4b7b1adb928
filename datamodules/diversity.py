"""Search result diversification data: DU-DIV and TREC Web diversity readers, a synthetic
subtopic generator and the MA4DIV datamodule.

An item is one query: ``feats [N+1, D]`` (row 0 the query), ``cov [N, T]`` binary subtopic
coverage, ``doc_mask [N]``, ``topic_mask [T]`` and ``given [N]`` (a stored reference ranking
when the source has one, else -1). Document order is shuffled on every ``__getitem__``, as the
MA4DIV reference does, so order-dependent agents cannot memorise slots.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.readers import DataFormatError, _iter_lines, _require_file

__all__ = [
    "DiversificationDataModule",
    "SRDQuery",
    "TRECDiversityQrels",
    "dudiv_queries",
    "read_dudiv",
    "read_dudiv_permutations",
    "read_trec_diversity_qrels",
    "read_trec_topics",
    "synthetic_srd",
]

SOURCES = ("synthetic", "dudiv")
DUDIV_LABELS = "query_doc_subtopics_doc15_2.json"
DUDIV_PERMUTATIONS = "query_permutation_doc15_2.json"


@dataclass
class SRDQuery:
    """One query's candidates: their features and which of the query's subtopics each covers."""

    qid: str
    features: np.ndarray             # [N + 1, D]: the query, then the documents
    coverage: np.ndarray             # [N, T] 0/1
    doc_ids: list[str] = field(default_factory=list)
    given: list[int] | None = None   # a stored reference ranking (document rows, best first)


def _line_of(text: str, needle: str) -> int:
    """1-based line of the first occurrence of ``needle`` (1 when absent): where a JSON key sits."""
    at = text.find(needle)
    return text.count("\n", 0, at) + 1 if at >= 0 else 1


def _load_json_object(path: Path, expected: str) -> tuple[dict, str]:
    _require_file(path, expected)
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(path, err.lineno, f"invalid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(obj, dict):
        raise DataFormatError(path, 1, f"expected a JSON object at the top, got {type(obj).__name__}")
    return obj, text


def read_dudiv(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """DU-DIV subtopic labels: ``{query_id: {doc_id: [subtopic_id, ...]}}`` (ids are strings, local to the query)."""
    path = Path(path)
    obj, text = _load_json_object(path, "the DU-DIV labels {query_id: {doc_id: [subtopic_id, ...]}}")
    for qid, docs in obj.items():
        if not isinstance(docs, dict) or not docs:
            raise DataFormatError(path, _line_of(text, f'"{qid}":'), f"query {qid!r}: expected a non-empty object "
                                                                    "{doc_id: [subtopic ids]}")
        for doc_id, topics in docs.items():
            if not isinstance(topics, list) or not all(isinstance(t, (str, int)) for t in topics):
                raise DataFormatError(path, _line_of(text, f'"{doc_id}":'),
                                      f"query {qid!r} doc {doc_id!r}: subtopics must be a list of ids")
    return {qid: {d: [str(t) for t in ts] for d, ts in docs.items()} for qid, docs in obj.items()}


def read_dudiv_permutations(path: str | Path) -> dict[str, list[str]]:
    """The MA4DIV reference rankings: ``{query_id: {"alphaNDCG": float, "permutation": [doc_id, ...]}}``."""
    path = Path(path)
    obj, text = _load_json_object(path, "the DU-DIV reference permutations")
    out = {}
    for qid, record in obj.items():
        perm = record.get("permutation") if isinstance(record, dict) else None
        if not isinstance(perm, list) or not all(isinstance(d, str) for d in perm):
            raise DataFormatError(path, _line_of(text, f'"{qid}":'), f"query {qid!r}: expected a 'permutation' list "
                                                                    "of document ids")
        out[qid] = perm
    return out


@dataclass
class TRECDiversityQrels:
    """TREC Web diversity judgements: per topic, each judged document's relevant subtopics (empty = judged
    non-relevant) and the topic's subtopics that have at least one relevant document."""

    judged: dict[str, dict[str, set[int]]]
    subtopics: dict[str, list[int]]

    def coverage(self, topic: str, docs: list[str]) -> np.ndarray:
        """[len(docs), |subtopics|] coverage of a ranking's documents (unjudged = covers nothing)."""
        index = {s: j for j, s in enumerate(self.subtopics[topic])}
        cov = np.zeros((len(docs), len(index)), dtype=np.float64)
        for i, doc in enumerate(docs):
            for s in self.judged[topic].get(doc, ()):
                cov[i, index[s]] = 1.0
        return cov


def read_trec_diversity_qrels(path: str | Path) -> TRECDiversityQrels:
    """``topic subtopic docno judgement`` per line (ndeval's qrels); judgement 0/1."""
    path = Path(path)
    _require_file(path, "TREC diversity qrels (topic subtopic docno judgement)")
    judged: dict[str, dict[str, set[int]]] = {}
    for line_no, line in _iter_lines(path):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 4:
            raise DataFormatError(path, line_no,
                                  f"expected 4 columns (topic subtopic docno judgement), got {len(fields)}")
        topic, subtopic, doc, judgement = fields
        if not subtopic.isdigit() or judgement not in ("0", "1"):
            raise DataFormatError(path, line_no, f"subtopic {subtopic!r} must be an integer and judgement "
                                                 f"{judgement!r} 0 or 1")
        topics = judged.setdefault(topic, {}).setdefault(doc, set())
        if judgement == "1":
            topics.add(int(subtopic))
    subtopics = {t: sorted(set().union(*docs.values())) for t, docs in judged.items()}
    return TRECDiversityQrels(judged, subtopics)


def read_trec_topics(path: str | Path) -> dict[str, str]:
    """``wt09-<n>:<query>`` per line -> ``{"<n>": query}``."""
    path = Path(path)
    _require_file(path, "TREC Web topics (wtYY-<n>:<query> per line)")
    topics = {}
    for line_no, line in _iter_lines(path):
        if not line.strip():
            continue
        name, sep, query = line.partition(":")
        number = name.rpartition("-")[2]
        if not sep or not number.isdigit() or not query.strip():
            raise DataFormatError(path, line_no, f"expected 'wtYY-<n>:<query>', got {line.strip()[:60]!r}")
        topics[number] = query.strip()
    return topics


def dudiv_queries(labels: dict[str, dict[str, list[str]]], permutations: dict[str, list[str]] | None = None,
                  dim: int = 32, doc_noise: float = 0.3, vectors: str = "per_query", seed: int = 0) -> list[SRDQuery]:
    """DU-DIV annotations with synthetic features (the real 1024-d ones are not public): a document
    is the sum of random vectors of its subtopics plus N(0, doc_noise²) noise; the query is the mean
    of its documents. ``vectors``: per_query (subtopic ids are local to a query) or shared (one
    vector per id string across queries)."""
    if vectors not in ("per_query", "shared"):
        raise ValueError(f"unknown subtopic vectors '{vectors}'; choose per_query or shared")
    rng = np.random.default_rng(seed)
    shared: dict[str, np.ndarray] = {}
    out = []
    for qid, docs in labels.items():
        doc_ids = list(docs)
        topics = sorted({t for ts in docs.values() for t in ts}, key=lambda t: (len(t), t))
        index = {t: j for j, t in enumerate(topics)}
        if vectors == "shared":
            for t in topics:
                if t not in shared:
                    shared[t] = rng.normal(size=dim)
            bank = np.stack([shared[t] for t in topics]) if topics else np.zeros((0, dim))
        else:
            bank = rng.normal(size=(len(topics), dim))
        cov = np.zeros((len(doc_ids), len(topics)))
        for i, d in enumerate(doc_ids):
            cov[i, [index[t] for t in docs[d]]] = 1.0
        doc_vecs = cov @ bank + rng.normal(scale=doc_noise, size=(len(doc_ids), dim))
        feats = np.vstack([doc_vecs.mean(0, keepdims=True), doc_vecs]).astype(np.float32)
        given = None
        if permutations is not None and qid in permutations:
            row = {d: i for i, d in enumerate(doc_ids)}
            given = [row[d] for d in permutations[qid] if d in row]
        out.append(SRDQuery(qid, feats, cov, doc_ids, given))
    return out


def synthetic_srd(n_queries: int, n_docs: int = 8, dim: int = 32, bank_size: int = 40, min_topics: int = 3,
                  max_topics: int = 6, max_cover: int = 3, empty_share: float = 0.125, query_noise: float = 0.1,
                  doc_noise: float = 0.3, seed: int = 0) -> list[SRDQuery]:
    """Generated diversification queries: subtopics drawn from a bank with Zipf popularity; each document
    covers 0..max_cover of its query's subtopics, popular ones more often (so documents are redundant),
    and about ``empty_share`` cover none. Document vector = sum of its subtopic vectors + noise; query
    vector = mean of its subtopic vectors + noise."""
    rng = np.random.default_rng(seed)
    bank = rng.normal(size=(bank_size, dim))
    popularity = 1.0 / np.arange(1, bank_size + 1)
    out = []
    for q in range(n_queries):
        n_topics = int(rng.integers(min_topics, max_topics + 1))
        topics = rng.choice(bank_size, size=n_topics, replace=False, p=popularity / popularity.sum())
        within = 1.0 / np.arange(1, n_topics + 1)
        cov = np.zeros((n_docs, n_topics))
        for i in range(n_docs):
            if rng.random() < empty_share:
                continue
            k = int(rng.integers(1, min(max_cover, n_topics) + 1))
            cov[i, rng.choice(n_topics, size=k, replace=False, p=within / within.sum())] = 1.0
        docs = cov @ bank[topics] + rng.normal(scale=doc_noise, size=(n_docs, dim))
        query = bank[topics].mean(0) + rng.normal(scale=query_noise, size=dim)
        out.append(SRDQuery(f"s{q}", np.vstack([query, docs]).astype(np.float32), cov))
    return out


class _Queries(Dataset):
    """Pads every query to ``n_docs`` x ``n_topics`` and shuffles its real documents per access."""

    def __init__(self, queries: list[SRDQuery], n_docs: int, n_topics: int, shuffle_seed: int | None) -> None:
        self.queries, self.n_docs, self.n_topics = queries, n_docs, n_topics
        # Evaluation draws a fixed permutation per query (reproducible numbers); training a fresh one each time.
        self.shuffle_seed = shuffle_seed

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        q = self.queries[i]
        n, t = q.coverage.shape
        generator = None
        if self.shuffle_seed is not None:
            generator = torch.Generator().manual_seed(self.shuffle_seed * 1_000_003 + i)
        perm = torch.randperm(n, generator=generator)
        feats = torch.zeros(self.n_docs + 1, q.features.shape[1])
        feats[0] = torch.from_numpy(q.features[0])
        feats[1:n + 1] = torch.from_numpy(q.features[1:])[perm]
        cov = torch.zeros(self.n_docs, self.n_topics)
        cov[:n, :t] = torch.from_numpy(q.coverage).float()[perm]
        given = torch.full((self.n_docs,), -1, dtype=torch.long)
        if q.given:
            where = torch.empty(n, dtype=torch.long)
            where[perm] = torch.arange(n)     # row r of the file sits at position where[r] after shuffling
            given[:len(q.given)] = where[torch.tensor(q.given)]
        return {"feats": feats, "cov": cov, "doc_mask": torch.arange(self.n_docs) < n,
                "topic_mask": torch.arange(self.n_topics) < t, "given": given}


class DiversificationDataModule(L.LightningDataModule):
    """Queries for MA4DIV. ``source``: synthetic (generated, the embedded default) or dudiv (the DU-DIV
    annotations at ``path`` with synthetic features, see ``dudiv_queries``). Queries are split
    train/test by ``test_fraction`` (seeded); validation monitors the test queries (nothing is
    selected on it). ``max_queries`` caps the queries read (quick runs)."""

    def __init__(
        self,
        source: str = "synthetic",
        path: str | None = None,
        n_docs: int = 8,
        feature_dim: int = 32,
        synthetic: dict | None = None,
        doc_noise: float = 0.3,
        subtopic_vectors: str = "per_query",
        test_fraction: float = 0.2,
        max_queries: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown data source '{source}'; choose one of {', '.join(SOURCES)}")
        if source == "dudiv" and not path:
            raise ValueError(f"data source 'dudiv' needs data.path (the folder with {DUDIV_LABELS})")
        self.save_hyperparameters()
        self.train_queries: list[SRDQuery] = []
        self.test_queries: list[SRDQuery] = []
        self.n_topics = 0

    def load(self) -> tuple[list[SRDQuery], list[SRDQuery]]:
        hp = self.hparams
        if hp.source == "synthetic":
            spec = {"n_docs": hp.n_docs, "dim": hp.feature_dim, "doc_noise": hp.doc_noise, **(hp.synthetic or {})}
            n_train, n_test = spec.pop("n_train", 600), spec.pop("n_test", 150)
            queries = synthetic_srd(n_train + n_test, seed=hp.seed, **spec)
            return queries[:n_train], queries[n_train:]
        folder = Path(hp.path)
        labels = read_dudiv(folder / DUDIV_LABELS)
        perm_path = folder / DUDIV_PERMUTATIONS
        permutations = read_dudiv_permutations(perm_path) if perm_path.is_file() else None
        qids = sorted(labels, key=lambda q: (len(q), q))
        random.Random(hp.seed).shuffle(qids)
        if hp.max_queries:
            qids = qids[: hp.max_queries]
        queries = dudiv_queries({q: labels[q] for q in qids}, permutations, hp.feature_dim, hp.doc_noise,
                                hp.subtopic_vectors, hp.seed)
        too_many = [q.qid for q in queries if q.coverage.shape[0] > hp.n_docs]
        if too_many:
            raise ValueError(f"{len(too_many)} DU-DIV queries have more than data.n_docs={hp.n_docs} documents "
                             f"(e.g. {too_many[0]})")
        n_test = int(hp.test_fraction * len(queries))   # 4,473 DU-DIV queries -> 3,579 / 894, as the reference
        return queries[n_test:], queries[:n_test]

    def setup(self, stage: str | None = None) -> None:
        if self.train_queries or self.test_queries:
            return
        self.train_queries, self.test_queries = self.load()
        everything = self.train_queries + self.test_queries
        self.n_topics = max(q.coverage.shape[1] for q in everything)
        dims = {q.features.shape[1] for q in everything}
        if dims != {self.hparams.feature_dim}:
            raise ValueError(f"features have width {sorted(dims)} but data.feature_dim={self.hparams.feature_dim}")

    def dataset(self, split: str) -> _Queries:
        queries = self.train_queries if split == "train" else self.test_queries
        return _Queries(queries, self.hparams.n_docs, self.n_topics, None if split == "train" else self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("train"), batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def _eval_loader(self) -> DataLoader:
        return DataLoader(self.dataset("test"), batch_size=self.hparams.eval_batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()
