"""The search environment agentic-RAG methods act in: a corpus, a frozen retriever tool and trajectory stats.

``SearchEnvironment.search(query)`` returns the top-k passages for a query (optionally restricted
to a candidate set, e.g. a HotpotQA question's own ten paragraphs); ``format`` renders them the way
an agent's prompt shows them; ``TrajectoryStats`` counts turns, searches, valid searches and
truncations per trajectory, and ``summarize`` turns a batch of them into the metrics every agent logs.

Retrievers share one small protocol, ``index(ids, texts)`` and ``search(queries, k, within)``:
``DenseSearch`` over any embedding function (the zoo's ``EmbeddingEncoder`` or the deterministic
``HashedBagOfWords``) with a faiss flat inner-product index, and ``BM25Search``. Retrieval is
deterministic: ties keep corpus order.
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from zoo.blocks.index import DenseIndex

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str

    def contents(self) -> str:
        return f"{self.title} {self.text}".strip() if self.title else self.text


class Retriever(Protocol):
    def index(self, ids: Sequence[str], texts: Sequence[str]) -> Retriever: ...

    def search(self, queries: Sequence[str], k: int,
               within: Sequence[Sequence[str] | None] | None = None) -> list[list[tuple[str, float]]]: ...


class HashedBagOfWords:
    """A deterministic text encoder: signed hashed counts of lower-cased words, L2-normalised.

    Needs no training and no download; the stand-in for E5 in the agentic-search defaults.
    """

    def __init__(self, dim: int = 1024, stopwords: Iterable[str] = ("the", "a", "an", "of", "in", "is", "was")):
        self.dim = dim
        self.stopwords = set(stopwords)

    def __call__(self, texts: Sequence[str]) -> Tensor:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                if word in self.stopwords:
                    continue
                code = zlib.crc32(word.encode())
                out[row, code % self.dim] += 1.0 if (code >> 31) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return torch.from_numpy(out / np.maximum(norms, 1e-12))


class DenseSearch:
    """Inner-product search over normalised embeddings: faiss flat index, exact scores within a subset.

    ``embed`` maps texts to an [n, d] tensor; ``query_prefix`` / ``passage_prefix`` are E5's
    "query: " / "passage: " when the encoder expects them.
    """

    def __init__(self, embed: Callable[[Sequence[str]], Tensor], query_prefix: str = "", passage_prefix: str = "",
                 device: str = "cpu") -> None:
        self.embed = embed
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self.device = device
        self.ids: list[str] = []
        self.row: dict[str, int] = {}
        self.vectors: Tensor | None = None
        self._index: DenseIndex | None = None

    @classmethod
    def from_encoder(cls, encoder, batch_size: int = 64, max_length: int = 256, **kwargs) -> DenseSearch:
        """Over a zoo ``EmbeddingEncoder`` (normalised embeddings, no gradient)."""
        def embed(texts: Sequence[str]) -> Tensor:
            return encoder.encode(list(texts), batch_size=batch_size, max_length=max_length, progress=False).cpu()
        return cls(embed, **kwargs)

    def index(self, ids: Sequence[str], texts: Sequence[str]) -> DenseSearch:
        self.ids = [str(i) for i in ids]
        self.row = {doc_id: r for r, doc_id in enumerate(self.ids)}
        self.vectors = self.embed([self.passage_prefix + t for t in texts]).float()
        self._index = DenseIndex(self.vectors.shape[1], device=self.device)
        self._index.add(self.ids, self.vectors)
        return self

    def search(self, queries: Sequence[str], k: int,
               within: Sequence[Sequence[str] | None] | None = None) -> list[list[tuple[str, float]]]:
        if self.vectors is None or self._index is None:
            raise RuntimeError("call index() before search()")
        q = self.embed([self.query_prefix + text for text in queries]).float()
        if within is None or all(w is None for w in within):
            scores, found = self._index.search(q, k)
            return [list(zip(ids, map(float, row))) for ids, row in zip(found, scores)]
        out = []
        for i, subset in enumerate(within):
            candidates = list(subset) if subset is not None else self.ids
            rows = torch.as_tensor([self.row[c] for c in candidates], dtype=torch.long)
            scores = self.vectors[rows] @ q[i]
            # stable sort: equal scores keep the candidates' order
            order = sorted(range(len(candidates)), key=lambda j: -float(scores[j]))[:k]
            out.append([(candidates[j], float(scores[j])) for j in order])
        return out


class BM25Search:
    """BM25 (the zoo's bm25s wrapper); ``within`` scores a small per-question index built on the fly."""

    def __init__(self, **bm25_options) -> None:
        from zoo.blocks.bm25 import BM25Retriever

        self._make = lambda: BM25Retriever(**bm25_options)
        self._bm25 = self._make()
        self.texts: dict[str, str] = {}
        self._subsets: dict[tuple[str, ...], object] = {}

    def index(self, ids: Sequence[str], texts: Sequence[str]) -> BM25Search:
        self.texts = dict(zip(map(str, ids), texts))
        self._bm25.index(list(self.texts), list(texts))
        self._subsets.clear()
        return self

    def search(self, queries: Sequence[str], k: int,
               within: Sequence[Sequence[str] | None] | None = None) -> list[list[tuple[str, float]]]:
        out = []
        for i, query in enumerate(queries):
            subset = None if within is None else within[i]
            if subset is None:
                engine = self._bm25
            else:
                key = tuple(subset)
                if key not in self._subsets:
                    self._subsets[key] = self._make().index(list(key), [self.texts[d] for d in key])
                engine = self._subsets[key]
            hits = engine.search([query], k=k)["0"]
            out.append(sorted(hits.items(), key=lambda kv: -kv[1])[:k])
        return out


@dataclass
class TrajectoryStats:
    """What one agent trajectory did with the tool; ``summarize`` averages a batch of them."""

    turns: int = 0
    searches: int = 0
    valid_searches: int = 0
    truncations: int = 0
    retrieved: list[list[str]] = field(default_factory=list)

    def truncated(self, count: int = 1) -> None:
        self.truncations += count


def summarize(stats: Sequence[TrajectoryStats], prefix: str = "") -> dict[str, float]:
    n = max(len(stats), 1)
    searches = sum(s.searches for s in stats)
    return {f"{prefix}turns": sum(s.turns for s in stats) / n,
            f"{prefix}searches": searches / n,
            f"{prefix}valid_search_rate": sum(s.valid_searches for s in stats) / max(searches, 1),
            f"{prefix}truncations": sum(s.truncations for s in stats) / n}


RETRIEVERS = ("bow", "bm25")


class SearchEnvironment:
    """A corpus behind a frozen retriever tool.

    ``query_format`` builds the retriever's input from the agent's query and the original
    question (Agentic-R's "{question} [SEP] {query}"); queries longer than ``max_query_words``
    and passages longer than ``max_passage_words`` are cut, and each cut counts as a truncation.
    """

    def __init__(self, ids: Sequence[str], titles: Sequence[str], texts: Sequence[str],
                 retriever: Retriever | str = "bow", k: int = 5, query_format: str = "{query}",
                 max_query_words: int = 64, max_passage_words: int = 100) -> None:
        if not (len(ids) == len(titles) == len(texts)):
            raise ValueError(f"corpus columns differ in length: {len(ids)} ids, {len(titles)} titles, {len(texts)} texts")
        if not ids:
            raise ValueError("a search environment needs a non-empty corpus")
        self.passages = {str(i): Passage(str(i), t, x) for i, t, x in zip(ids, titles, texts)}
        if len(self.passages) != len(ids):
            raise ValueError("passage ids must be unique")
        if isinstance(retriever, str):
            if retriever not in RETRIEVERS:
                raise ValueError(f"unknown retriever '{retriever}'; choose one of {RETRIEVERS} or pass a Retriever")
            retriever = DenseSearch(HashedBagOfWords()) if retriever == "bow" else BM25Search(stopwords=None)
        self.retriever = retriever.index(list(self.passages), [p.contents() for p in self.passages.values()])
        self.k = k
        self.query_format = query_format
        self.max_query_words, self.max_passage_words = max_query_words, max_passage_words

    @classmethod
    def from_world(cls, world, **kwargs) -> SearchEnvironment:
        return cls(*world.corpus(), **kwargs)

    def reindex(self, retriever: Retriever) -> None:
        """Swap in a new retriever (e.g. after a retriever-training iteration) over the same corpus."""
        self.retriever = retriever.index(list(self.passages), [p.contents() for p in self.passages.values()])

    def search(self, query: str, *, question: str | None = None, k: int | None = None,
               within: Sequence[str] | None = None, stats: TrajectoryStats | None = None) -> list[Passage]:
        return self.search_batch([query], questions=None if question is None else [question], k=k,
                                 within=None if within is None else [within],
                                 stats=None if stats is None else [stats])[0]

    def search_batch(self, queries: Sequence[str], *, questions: Sequence[str] | None = None, k: int | None = None,
                     within: Sequence[Sequence[str] | None] | None = None,
                     stats: Sequence[TrajectoryStats] | None = None) -> list[list[Passage]]:
        """Top-k passages per query. An empty query is an invalid search: no results, counted in stats."""
        k = k or self.k
        inputs, valid = [], []
        for i, query in enumerate(queries):
            words = query.split()
            if stats is not None:
                stats[i].searches += 1
                stats[i].valid_searches += bool(words)
                if len(words) > self.max_query_words:
                    stats[i].truncated()
            query = " ".join(words[:self.max_query_words])
            question = questions[i] if questions is not None else ""
            inputs.append(self.query_format.format(query=query, question=question))
            valid.append(bool(words))
        results: list[list[Passage]] = [[] for _ in queries]
        live = [i for i, ok in enumerate(valid) if ok]
        if live:
            hits = self.retriever.search([inputs[i] for i in live], k,
                                         None if within is None else [within[i] for i in live])
            for i, found in zip(live, hits):
                results[i] = [self._cut(self.passages[doc_id], stats[i] if stats is not None else None)
                              for doc_id, _ in found]
                if stats is not None:
                    stats[i].retrieved.append([p.id for p in results[i]])
        return results

    def _cut(self, passage: Passage, stats: TrajectoryStats | None) -> Passage:
        words = passage.text.split()
        if len(words) <= self.max_passage_words:
            return passage
        if stats is not None:
            stats.truncated()
        return Passage(passage.id, passage.title, " ".join(words[:self.max_passage_words]))

    @staticmethod
    def format(passages: Sequence[Passage], style: str = "doc") -> str:
        """Render results for a prompt.

        ``doc``: "Doc1: title text" lines (M-ASK); ``document``: "Document0: ..." (JADE's DS ids);
        ``information``: Search-R1's "<information> Doc 1(Title: t) text ... </information>".
        """
        if style == "doc":
            return "\n".join(f"Doc{i + 1}: {p.contents()}" for i, p in enumerate(passages))
        if style == "document":
            return "\n".join(f"Document{i}: {p.contents()}" for i, p in enumerate(passages))
        if style == "information":
            body = "\n".join(f"Doc {i + 1}(Title: {p.title}) {p.text}" for i, p in enumerate(passages))
            return f"<information> {body} </information>"
        raise ValueError(f"unknown passage style '{style}'; choose doc, document or information")


def passages_from_records(records: Iterable[Mapping[str, str]]) -> tuple[list[str], list[str], list[str]]:
    """(ids, titles, texts) from dicts with ``id``, optional ``title`` and ``text``."""
    ids, titles, texts = [], [], []
    for r in records:
        ids.append(str(r["id"]))
        titles.append(r.get("title", ""))
        texts.append(r["text"])
    return ids, titles, texts
