import math
import time

import numpy as np
import pytest
import torch
from torchmetrics.functional.retrieval import (
    retrieval_average_precision,
    retrieval_normalized_dcg,
    retrieval_recall,
    retrieval_reciprocal_rank,
)

from zoo.blocks.metrics import evaluate_run, parse_metric, per_query

QRELS = {
    "q1": {"a": 2, "b": 0, "c": 1, "d": 1},  # d is relevant but never retrieved
    "q2": {"x": 1, "y": 0},
    "q3": {"z": 0},  # no relevant doc: not evaluated
    "q4": {"m": 1},  # missing from the run: scores 0
}
RUN = {
    "q1": {"a": 3.0, "b": 2.0, "c": 1.0, "e": 0.5},  # grades by rank: 2, 0, 1, unjudged
    "q2": {"y": 0.9, "x": 0.1},  # grades by rank: 0, 1
    "q3": {"z": 1.0},
    "extra": {"a": 1.0},  # not in qrels: ignored
}


def test_hand_computed_values():
    scores = per_query(QRELS, RUN, ["ndcg@3", "mrr@10", "recall@3", "map", "map@2"])
    assert set(scores["map"]) == {"q1", "q2", "q4"}

    # q1: DCG@3 = 2/log2(2) + 0/log2(3) + 1/log2(4) = 2.5; ideal gains [2, 1, 1] (d counts)
    # give IDCG@3 = 2 + 1/log2(3) + 1/log2(4).
    assert scores["ndcg@3"]["q1"] == pytest.approx(2.5 / (2 + 1 / math.log2(3) + 0.5))
    # q2: the only relevant doc is at rank 2: DCG = 1/log2(3), IDCG = 1.
    assert scores["ndcg@3"]["q2"] == pytest.approx(1 / math.log2(3))
    assert scores["mrr@10"] == {"q1": 1.0, "q2": 0.5, "q4": 0.0}
    # q1 retrieves a and c of its 3 relevant docs: the unretrieved d stays in the denominator.
    assert scores["recall@3"]["q1"] == pytest.approx(2 / 3)
    # AP q1: relevant at ranks 1 and 3 -> (1/1 + 2/3) / 3 relevant; q2: (1/2) / 1.
    assert scores["map"]["q1"] == pytest.approx((1 + 2 / 3) / 3)
    assert scores["map"]["q2"] == pytest.approx(0.5)
    # map@2 stops at rank 2 but still divides by all 3 relevant docs.
    assert scores["map@2"]["q1"] == pytest.approx(1 / 3)
    assert all(values["q4"] == 0.0 for values in scores.values())

    means = evaluate_run(QRELS, RUN, ["map", "mrr@10"])
    assert means["map"] == pytest.approx(((1 + 2 / 3) / 3 + 0.5 + 0.0) / 3)
    assert means["mrr@10"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_cutoff_limits_the_ranks_seen():
    qrels = {"q": {"a": 1}}
    run = {"q": {"x": 3.0, "y": 2.0, "a": 1.0}}
    assert per_query(qrels, run, ["mrr@2", "mrr@3", "recall@2", "ndcg@2"]) == {
        "mrr@2": {"q": 0.0},
        "mrr@3": {"q": pytest.approx(1 / 3)},
        "recall@2": {"q": 0.0},
        "ndcg@2": {"q": 0.0},
    }


def test_ties_are_broken_by_docid_descending():
    run = {"q": {"a": 1.0, "b": 1.0, "c": 1.0}}  # trec_eval ranks them c, b, a
    assert evaluate_run({"q": {"c": 1}}, run, ["mrr@10"])["mrr@10"] == 1.0
    assert evaluate_run({"q": {"b": 1}}, run, ["mrr@10"])["mrr@10"] == 0.5
    assert evaluate_run({"q": {"a": 1}}, run, ["mrr@10"])["mrr@10"] == pytest.approx(1 / 3)


def test_recall_and_ndcg_count_unretrieved_relevant_docs_unlike_torchmetrics():
    qrels = {"q": {"a": 1, "b": 1, "c": 1, "d": 1}}
    run = {"q": {"a": 1.0, "x": 0.5}}
    ours = evaluate_run(qrels, run, ["recall@100", "ndcg@10"])
    assert ours["recall@100"] == pytest.approx(0.25)
    ideal = sum(1 / math.log2(r + 1) for r in range(1, 5))
    assert ours["ndcg@10"] == pytest.approx(1.0 / ideal)
    # torchmetrics sees only the retrieved list and so reports a perfect run.
    preds, target = torch.tensor([1.0, 0.5]), torch.tensor([True, False])
    assert retrieval_recall(preds, target).item() == 1.0
    assert retrieval_normalized_dcg(preds, target).item() == 1.0


def test_negative_grades_are_judged_non_relevant():
    qrels = {"q": {"a": -1, "b": 1}}
    run = {"q": {"a": 2.0, "b": 1.0}}
    scores = evaluate_run(qrels, run, ["mrr@10", "ndcg@10"])
    assert scores["mrr@10"] == 0.5
    assert scores["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_empty_and_missing_runs_score_zero():
    assert evaluate_run({"q": {"a": 1}}, {}, ["ndcg@10", "mrr", "recall@5", "map"]) == {
        "ndcg@10": 0.0, "mrr": 0.0, "recall@5": 0.0, "map": 0.0
    }
    assert evaluate_run({"q": {"a": 1}}, {"q": {}}, ["map"]) == {"map": 0.0}


def test_no_evaluable_query_is_an_error():
    with pytest.raises(ValueError, match="no query with a relevant document"):
        evaluate_run({"q": {"a": 0}}, {"q": {"a": 1.0}})


def test_metric_names():
    assert parse_metric("nDCG@10") == ("ndcg", 10)
    assert parse_metric("map") == ("map", None)
    with pytest.raises(ValueError, match="valid names: ndcg, mrr, recall, map"):
        parse_metric("p@10")
    for bad in ("ndcg@0", "ndcg@x", "ndcg@"):
        with pytest.raises(ValueError, match="positive integer"):
            parse_metric(bad)
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        evaluate_run(QRELS, RUN, ["bleu"])


def test_agrees_with_torchmetrics_on_complete_runs():
    """Where every judged doc is retrieved, the two definitions coincide."""
    rng = np.random.default_rng(0)
    qrels, run = {}, {}
    for q in range(40):
        n_docs = int(rng.integers(3, 30))
        grades = rng.integers(0, 4, size=n_docs)
        grades[rng.integers(n_docs)] = int(rng.integers(1, 4))  # at least one relevant
        # Distinct (torchmetrics averages ties) and positive (its AP drops docs scored <= 0).
        scores = rng.permutation(n_docs).astype(float) + 1.0
        docs = [f"d{i}" for i in range(n_docs)]
        # A prefix of the docs is judged, the rest are unjudged (grade 0); the best doc is always judged.
        n_judged = int(rng.integers(1, n_docs + 1))
        qrels[f"q{q}"] = {d: int(g) for d, g in zip(docs[:n_judged], grades[:n_judged])}
        qrels[f"q{q}"][docs[int(np.argmax(grades))]] = int(grades.max())
        run[f"q{q}"] = dict(zip(docs, scores))

    checks = {
        "ndcg@3": lambda p, t: retrieval_normalized_dcg(p, t, top_k=3),
        "ndcg@10": lambda p, t: retrieval_normalized_dcg(p, t, top_k=10),
        "ndcg": lambda p, t: retrieval_normalized_dcg(p, t),
        "mrr@5": lambda p, t: retrieval_reciprocal_rank(p, t > 0, top_k=5),
        "recall@5": lambda p, t: retrieval_recall(p, t > 0, top_k=5),
        "map": lambda p, t: retrieval_average_precision(p, t > 0),
    }
    ours = per_query(qrels, run, list(checks))
    for qid, scores in run.items():
        docs = list(scores)
        preds = torch.tensor([scores[d] for d in docs])
        target = torch.tensor([qrels[qid].get(d, 0) for d in docs])
        for metric, reference in checks.items():
            assert ours[metric][qid] == pytest.approx(reference(preds, target).item(), abs=1e-6), (metric, qid)


def test_large_run_is_fast():
    rng = np.random.default_rng(1)
    qrels = {f"q{q}": {f"d{d}": int(rng.integers(0, 3)) for d in rng.integers(0, 5000, 20)} for q in range(1000)}
    run = {q: {f"d{d}": float(s) for d, s in zip(rng.integers(0, 5000, 100), rng.random(100))} for q in qrels}
    start = time.perf_counter()
    evaluate_run(qrels, run)
    assert time.perf_counter() - start < 5.0
