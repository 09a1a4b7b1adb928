"""BM25 retrieval on top of the `bm25s` library (sparse, in-memory, CPU)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import bm25s
from bm25s.tokenization import Tokenizer

__all__ = ["BM25Retriever"]


def _make_stemmer(stemmer: str | Callable[[str], str] | None) -> Callable[[str], str] | None:
    """A language name means a PyStemmer (Snowball) stemmer, imported only when asked for."""
    if not isinstance(stemmer, str):
        return stemmer
    try:
        import Stemmer
    except ImportError as err:
        raise ImportError(
            f"stemmer={stemmer!r} needs the optional PyStemmer package (pip install PyStemmer); "
            "pass stemmer=None or a callable word -> stem instead"
        ) from err
    return Stemmer.Stemmer(stemmer).stemWord


class BM25Retriever:
    """Index documents, then search them with BM25 (Lucene's variant, as in bm25s).

    Defaults k1=0.9, b=0.4 are Anserini's BM25 defaults. `stopwords` is anything
    bm25s accepts ("en", a list, or None); `stemmer` is None, a callable mapping a
    word to its stem, or a Snowball language name such as "english" (needs PyStemmer).
    """

    def __init__(
        self,
        k1: float = 0.9,
        b: float = 0.4,
        stopwords: str | Sequence[str] | None = "en",
        stemmer: str | Callable[[str], str] | None = None,
        progress: bool = False,
    ):
        self.k1, self.b = k1, b
        self.stopwords = stopwords
        self.stemmer = _make_stemmer(stemmer)
        self.progress = progress
        self._doc_ids: list[str] = []
        self._model: bm25s.BM25 | None = None
        self._tokenizer: Tokenizer | None = None

    def index(self, doc_ids: list[str], texts: list[str]) -> BM25Retriever:
        """Replace the index with these documents; returns self."""
        if len(doc_ids) != len(texts):
            raise ValueError(f"{len(doc_ids)} doc ids but {len(texts)} texts")
        if len(set(doc_ids)) != len(doc_ids):
            raise ValueError("doc ids must be unique")
        if not doc_ids:
            raise ValueError("cannot index an empty corpus")
        self._tokenizer = Tokenizer(stopwords=self.stopwords, stemmer=self.stemmer)
        tokens = self._tokenizer.tokenize(
            list(texts), update_vocab=True, return_as="tuple", show_progress=self.progress
        )
        self._model = bm25s.BM25(k1=self.k1, b=self.b)
        self._model.index(tokens, show_progress=self.progress)
        self._doc_ids = [str(doc_id) for doc_id in doc_ids]
        return self

    def search(self, queries: Mapping[str, str] | Sequence[str], k: int = 100) -> dict[str, dict[str, float]]:
        """Top-`k` docs per query as ``{qid: {doc_id: score}}`` (list input: qid = str(index)).

        Only docs sharing a term with the query are returned (their score is > 0), so a
        query may get fewer than `k`, and one with no indexed term gets none.
        """
        if self._model is None or self._tokenizer is None:
            raise RuntimeError("call index() before search()")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if isinstance(queries, Mapping):
            qids, texts = [str(q) for q in queries], list(queries.values())
        else:
            qids, texts = [str(i) for i in range(len(queries))], list(queries)

        # update_vocab=False: a query term unseen in the corpus cannot match and is dropped.
        token_ids = self._tokenizer.tokenize(texts, update_vocab=False, return_as="ids", show_progress=self.progress)
        # bm25s pads a term-less text with the "" token; it matches nothing useful in a query.
        empty_id = self._tokenizer.word_to_id.get("")
        token_ids = [[t for t in ids if t != empty_id] for ids in token_ids]

        results: dict[str, dict[str, float]] = {qid: {} for qid in qids}
        searchable = [i for i, ids in enumerate(token_ids) if ids]
        if not searchable:
            return results
        found = self._model.retrieve(
            [token_ids[i] for i in searchable],
            k=min(k, len(self._doc_ids)),
            show_progress=self.progress,
        )
        for row, i in enumerate(searchable):
            results[qids[i]] = {
                self._doc_ids[doc]: float(score)
                for doc, score in zip(found.documents[row].tolist(), found.scores[row].tolist())
                if score > 0
            }
        return results
