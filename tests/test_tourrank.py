"""TourRank: tournament invariants with oracle selectors, parser, data reader, and a tiny-LLM run."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from datamodules.readers import DataFormatError
from datamodules.trec_rerank import TrecRerankDataModule, read_candidates
from zoo.tourrank.module import (
    DEFAULT_STAGES,
    TourRankModule,
    check_stages,
    parse_selection,
    ranking_from_scores,
    run_tournaments,
    seeded_groups,
)

PAPER = DEFAULT_STAGES[100]


def oracle(score):
    """A selector that takes the top-m documents by a hidden score, ignoring presentation order."""
    def select(requests):
        return [sorted(shown, key=lambda d: -score[d])[:m] for shown, m in requests]
    return select


def counting(select, log):
    def wrapped(requests):
        log.append(requests)
        return select(requests)
    return wrapped


def test_point_mass_histogram_and_call_budget():
    rng = random.Random(0)
    score = [rng.random() for _ in range(100)]
    log = []
    points, calls = run_tournaments(100, PAPER, 3, counting(oracle(score), log), shuffle_seed="x")
    assert calls == 13 * 3 and len(log) == 5  # 13 calls per tournament in 5 stage-synchronous rounds
    assert sum(len(shown) for requests in log for shown, _ in requests) == 185 * 3
    for p in points:
        assert int(p.sum()) == 87
        assert Counter(p.tolist()) == {0: 50, 1: 30, 2: 10, 3: 5, 4: 3, 5: 2}
    assert int(points.sum()) == 87 * 3 and int(points.sum(0).max()) == 5 * 3


def test_seeded_grouping_is_round_robin_and_covers_candidates():
    groups = seeded_groups(list(range(100)), 5)
    for g, group in enumerate(groups):
        assert all(pos % 5 == g for pos in group) and len(group) == 20
        assert sum(pos < 5 for pos in group) == 1
    assert sorted(pos for group in groups for pos in group) == list(range(100))


@pytest.mark.parametrize("seed", range(5))
def test_oracle_top_documents_and_within_group_monotonicity(seed):
    rng = random.Random(seed)
    score = [rng.random() for _ in range(100)]
    best = sorted(range(100), key=lambda d: -score[d])
    log = []
    points, _ = run_tournaments(100, PAPER, 2, counting(oracle(score), log), shuffle_seed=str(seed))
    for p in points:
        assert p[best[0]] == 5 and p[best[1]] == 5 and p[best[2]] == 4 and p[best[3]] == 4
        assert all(p[d] >= 1 for d in best[:10])
    assert ranking_from_scores(points.sum(0).tolist())[:2] == sorted(best[:2])
    for requests in log:  # every selected member beats every unselected one of its group
        for (shown, m), chosen in zip(requests, oracle(score)(requests)):
            assert min(score[d] for d in chosen) > max(score[d] for d in shown if d not in chosen)


def test_order_free_selector_gives_identical_tournaments_for_any_shuffle_seed():
    rng = random.Random(1)
    score = [rng.random() for _ in range(100)]
    a, _ = run_tournaments(100, PAPER, 3, oracle(score), shuffle_seed="a")
    b, _ = run_tournaments(100, PAPER, 1, oracle(score), shuffle_seed="b")
    assert torch.equal(a, b.expand(3, -1))
    assert ranking_from_scores(a.sum(0).tolist()) == ranking_from_scores(b[0].tolist())


def test_identity_selector_and_empty_selector_reproduce_first_stage_order():
    first_stage = oracle([-d for d in range(100)])  # prefers better first-stage ranks
    points, _ = run_tournaments(100, PAPER, 2, first_stage, shuffle_seed="s")
    assert ranking_from_scores(points.sum(0).tolist()) == list(range(100))
    points, _ = run_tournaments(100, PAPER, 2, lambda requests: [[] for _ in requests])
    assert ranking_from_scores(points.sum(0).tolist()) == list(range(100))


def test_seeding_makes_points_depend_on_first_stage_order():
    # Oracle score 100 - i for document i. Order A: identity. Order B: oracle ranks 1-20 at
    # positions 0, 5, ..., 95, i.e. all in group 0 of stage 1.
    order_b = [None] * 100
    order_b[0::5] = list(range(20))
    rest = iter(range(20, 100))
    order_b = [d if d is not None else next(rest) for d in order_b]
    points_a, _ = run_tournaments(100, PAPER, 1, oracle([100 - d for d in range(100)]))
    points_b, _ = run_tournaments(100, PAPER, 1, oracle([100 - d for d in order_b]))
    in_b = {d: points_b[0, pos].item() for pos, d in enumerate(order_b)}
    assert points_a[0, 15] == 2 and in_b[15] == 0
    assert ranking_from_scores(points_a[0].tolist())[:2] == [0, 1]
    assert sorted(order_b[i] for i in ranking_from_scores(points_b[0].tolist())[:2]) == [0, 1]


def test_shuffle_is_seeded_and_reaches_an_order_dependent_selector():
    first_shown = lambda requests: [shown[:m] for shown, m in requests]
    a, _ = run_tournaments(20, DEFAULT_STAGES[20], 3, first_shown, shuffle_seed="q1")
    b, _ = run_tournaments(20, DEFAULT_STAGES[20], 3, first_shown, shuffle_seed="q1")
    c, _ = run_tournaments(20, DEFAULT_STAGES[20], 3, first_shown, shuffle_seed="q2")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # tournaments differ through their shuffles


def test_stage_schedule_is_validated():
    with pytest.raises(ValueError, match="start with 30"):
        check_stages(DEFAULT_STAGES[20], 30)
    with pytest.raises(ValueError, match="survivors"):
        check_stages([[20, 1, 10], [8, 1, 4]], 20)


def test_parser():
    assert parse_selection("Document 3, Document 12, Document 1", 20) == [3, 12, 1]
    assert parse_selection("Sure.\nAnswer: Document 2, ..., Document 3, Document 3, Document 99.", 5) == [2, 3]
    assert parse_selection("no idea", 5) == []


def _write(tmp_path, lines):
    path = tmp_path / "cands.jsonl"
    path.write_text("\n".join(lines))
    return path


def test_reader_orders_by_rank_and_names_bad_lines(tmp_path):
    hit = lambda d, r: {"qid": 7, "docid": d, "rank": r, "score": 1.0, "content": f"text {d}"}
    good = json.dumps({"query": "q", "hits": [hit("b", 2), hit("a", 1), hit("c", 3)]})
    rows = read_candidates(_write(tmp_path, [good]), top_k=2)
    assert rows == [{"qid": "7", "query": "q", "doc_ids": ["a", "b"], "texts": ["text a", "text b"]}]
    bad = json.dumps({"query": "q", "hits": [{"qid": 7, "docid": "a"}]})
    with pytest.raises(DataFormatError, match=r"cands.jsonl:2: hit 0 lacks"):
        read_candidates(_write(tmp_path, [good, bad]))


def test_dl19_file_loads(shared_data):
    folder = shared_data / "trec-dl-passage-bm25-top100"
    dm = TrecRerankDataModule(source="file", path=str(folder / "bm25_dl19_top100.jsonl"),
                              qrels=str(folder / "qrels_dl19.txt"), top_k=100, max_queries=2)
    dm.setup("test")
    assert len(dm.rows) == 2 and all(len(r["doc_ids"]) == 100 and r["qrels"] for r in dm.rows)


@pytest.mark.parametrize("method,selector,calls", [("tourrank", "listwise", 2 * 3), ("tourrank", "pointwise", 2 * 3),
                                                   ("tourrank", "generate", 2 * 2), ("pointwise", "listwise", 10),
                                                   ("sliding_window", "listwise", 2), ("bm25", "listwise", 0)])
def test_module_runs_every_method_and_counts_llm_calls(method, selector, calls):
    dm = TrecRerankDataModule(top_k=20 if selector != "generate" else 10, synthetic={"num_queries": 1})
    dm.setup("test")
    row = dm.rows[0]
    if method == "pointwise":
        row = {**row, "doc_ids": row["doc_ids"][:10], "texts": row["texts"][:10]}
    model = TourRankModule(method=method, selector=selector, num_tournaments=2, window=10, stride=10,
                           max_new_tokens=4, passage_max_words=8)
    out = model.rerank(row)
    assert out["calls"] == calls
    assert sorted(out["ranking"]) == list(range(len(row["doc_ids"])))
    if method == "tourrank":
        assert len(out["prefixes"]) == 2
    model.cache.clear()
    assert model.rerank(row)["ranking"] == out["ranking"]  # same model and seed -> same ranking


def test_overriding_select_alone_drives_the_tournament():
    dm = TrecRerankDataModule(top_k=20, synthetic={"num_queries": 1})
    dm.setup("test")
    row = dm.rows[0]
    rng = random.Random(3)
    hidden = {text: rng.random() for text in row["texts"]}

    class Oracle(TourRankModule):
        def select(self, query, docs, m):
            return sorted(range(len(docs)), key=lambda j: -hidden[docs[j]])[:m]

    model = Oracle(num_tournaments=2)
    out = model.rerank(row)
    best = sorted(range(20), key=lambda d: -hidden[row["texts"][d]])
    assert sorted(out["ranking"][:2]) == sorted(best[:2]) and out["calls"] == 2 * 3
