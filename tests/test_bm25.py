import sys

import pytest

from datamodules.readers import read_cranfield
from zoo.blocks.bm25 import BM25Retriever
from zoo.blocks.metrics import evaluate_run

DOC_IDS = ["d1", "d2", "d3", "d4"]
TEXTS = [
    "Pressure distribution over a cone at hypersonic speed.",
    "Supersonic flutter of thin wing panels.",
    "Heat transfer in laminar boundary layers.",
    "Boundary layer transition on a flat plate.",
]


def test_doc_sharing_query_terms_ranks_first():
    retriever = BM25Retriever().index(DOC_IDS, TEXTS)
    results = retriever.search({"qa": "wing flutter at supersonic speeds", "qb": "laminar heat transfer"}, k=2)
    assert next(iter(results["qa"])) == "d2"
    assert next(iter(results["qb"])) == "d3"
    assert all(len(docs) <= 2 for docs in results.values())
    assert all(isinstance(score, float) and score > 0 for docs in results.values() for score in docs.values())
    scores = list(results["qb"].values())
    assert scores == sorted(scores, reverse=True)


def test_list_queries_use_positions_as_ids_and_k_may_exceed_corpus():
    results = BM25Retriever().index(DOC_IDS, TEXTS).search(["boundary layer", "cone pressure"], k=100)
    assert list(results) == ["0", "1"]
    # Only docs sharing a term are returned, however large k is.
    assert set(results["0"]) == {"d3", "d4"}
    assert list(results["1"]) == ["d1"]


def test_query_without_indexed_terms_gets_no_results():
    results = BM25Retriever().index(DOC_IDS, TEXTS).search({"q": "the of zebra", "empty": ""}, k=3)
    assert results == {"q": {}, "empty": {}}


def test_stopwords_are_dropped_by_default():
    texts = ["the cone", "of the plate"]
    assert BM25Retriever().index(["a", "b"], texts).search(["the cone"])["0"].keys() == {"a"}
    assert BM25Retriever(stopwords=None).index(["a", "b"], texts).search(["the"])["0"].keys() == {"a", "b"}


def test_callable_stemmer_is_applied_to_docs_and_queries():
    def strip_plural(word: str) -> str:
        return word[:-1] if word.endswith("s") else word

    assert BM25Retriever().index(DOC_IDS, TEXTS).search(["panel"])["0"] == {}
    stemmed = BM25Retriever(stemmer=strip_plural).index(DOC_IDS, TEXTS)
    assert list(stemmed.search(["panel"])["0"]) == ["d2"]


def test_named_stemmer_without_pystemmer_explains_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "Stemmer", None)  # makes `import Stemmer` fail
    with pytest.raises(ImportError, match="PyStemmer"):
        BM25Retriever(stemmer="english")


def test_no_progress_bars_by_default(capfd):
    BM25Retriever().index(DOC_IDS, TEXTS).search(["wing"], k=2)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_misuse_is_reported():
    with pytest.raises(RuntimeError, match="index"):
        BM25Retriever().search(["wing"])
    with pytest.raises(ValueError, match="2 doc ids but 1 texts"):
        BM25Retriever().index(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="unique"):
        BM25Retriever().index(["a", "a"], ["x", "y"])
    with pytest.raises(ValueError, match="k must be"):
        BM25Retriever().index(DOC_IDS, TEXTS).search(["wing"], k=0)


def test_cranfield_effectiveness(shared_data):
    data = read_cranfield(shared_data / "cranfield")
    doc_ids = list(data.corpus)
    retriever = BM25Retriever().index(doc_ids, [data.doc_text(d) for d in doc_ids])
    run = retriever.search(data.queries, k=1000)
    scores = evaluate_run(data.qrels, run, ["ndcg@10", "map", "recall@100"])
    print(f"BM25 on Cranfield ({len(data.queries)} queries, gain = 5 - code): {scores}")
    # Published BM25 nDCG@10 on Cranfield is roughly 0.30-0.45; the MAP bounds are a loose sanity range.
    assert 0.30 <= scores["ndcg@10"] <= 0.45
    assert 0.20 <= scores["map"] <= 0.40
