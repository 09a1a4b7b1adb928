"""Shared LTR, click and diversity blocks and their readers: hand examples, the specs' properties,
and the real data's structure (Yahoo LTR sample, Yandex clicks, DU-DIV, TREC Web diversity qrels)."""
import itertools
import math

import numpy as np
import pytest
import torch

from datamodules.diversity import (
    read_dudiv,
    read_trec_diversity_qrels,
    read_trec_topics,
)
from datamodules.ltr import read_svmlight, read_yandex_clicks
from datamodules.readers import DataFormatError
from zoo.blocks.clicks import (
    ETA,
    PBMSimulator,
    UserPBMSimulator,
    activity,
    allocate_sessions,
    examination,
    fit_pbm_em,
    global_propensity,
    harvest_propensity,
)
from zoo.blocks.diversity import (
    alpha_dcg,
    alpha_ndcg,
    err_ia,
    greedy_ideal,
    in_rank_order,
    s_recall,
)
from zoo.blocks.ltr import (
    MLPScorer,
    build_scorer,
    err_at_k,
    listwise_softmax_loss,
    ndcg_at_k,
)
from zoo.blocks.metrics import per_query


# -- LTR -----------------------------------------------------------------------------------------
def test_listwise_softmax_loss_matches_hand_computation_and_ignores_padding():
    scores = torch.tensor([[2.0, 0.0, 1.0, 9.0]])
    labels = torch.tensor([[1.0, 0.0, 3.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    log_p = torch.log_softmax(torch.tensor([2.0, 0.0, 1.0]), 0)
    eps = 1e-7
    weights = torch.tensor([1.0, 0.0, 3.0]) + eps
    expected = -(weights * log_p).sum() / weights.sum()
    torch.testing.assert_close(listwise_softmax_loss(scores, labels, mask), expected)
    # Batch normaliser: the label mass of every list together.
    two = listwise_softmax_loss(scores.repeat(2, 1), torch.cat([labels, 2 * labels]), mask.repeat(2, 1))
    torch.testing.assert_close(two, -(3 * weights * log_p).sum() / (3 * weights.sum() - eps * 3))


def test_ndcg_is_one_for_label_order_and_in_unit_interval_otherwise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200, 12), generator=g)
    mask = torch.rand(200, 12, generator=g) > 0.2
    for k in (1, 3, 5, 10):
        perfect = ndcg_at_k(labels.float() + 0.01 * torch.rand(200, 12, generator=g), labels, mask, k)
        relevant = ((labels > 0) & mask).any(1)
        # The label order up to ties among equal labels, which does not change DCG.
        torch.testing.assert_close(perfect[relevant], torch.ones(int(relevant.sum()), dtype=torch.float64))
        random = ndcg_at_k(torch.randn(200, 12, generator=g), labels, mask, k)
        assert bool(((random >= 0) & (random <= 1 + 1e-12)).all())


def test_err_matches_a_hand_computed_three_document_example():
    # grades by rank 4, 0, 2: R = 15/16, 0, 3/16
    got = err_at_k(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[4, 0, 2]]), torch.ones(1, 3, dtype=torch.bool), 3)
    expected = 15 / 16 + 0 + (1 / 3) * (3 / 16) * (1 - 15 / 16)
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_scorers_shape_and_layout():
    mlp = build_scorer(7, "mlp", hidden=[5, 4])
    assert isinstance(mlp, MLPScorer) and mlp(torch.randn(2, 3, 7)).shape == (2, 3)
    kinds = [type(m).__name__ for m in mlp.net]
    assert kinds == ["LayerNorm", "Linear", "ELU", "LayerNorm", "Linear", "ELU", "LayerNorm", "Linear"]
    assert build_scorer(7, "linear")(torch.randn(4, 7)).shape == (4,)
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer(7, "tree")


# -- readers -------------------------------------------------------------------------------------
def test_yahoo_sample_reads_with_the_readme_counts(shared_data):
    data = read_svmlight(shared_data / "ltr-yahoo-sample-lightgbm" / "rank.train", n_features=300)
    assert len(data) == 201 and data.features.shape == (3005, 300)
    assert np.bincount(data.labels).tolist() == [645, 1211, 858, 222, 69]
    assert data.offsets[-1] == 3005 and data.features.max() <= 1.0


def test_svmlight_letor_qids_and_malformed_lines(tmp_path):
    good = tmp_path / "letor.txt"
    good.write_text("2 qid:10 1:0.5 3:1.0 # doc a\n0 qid:10 2:0.25\n1 qid:11 1:1\n")
    data = read_svmlight(good)
    assert data.qids == ["10", "11"] and data.offsets.tolist() == [0, 2, 3]
    assert data.features.tolist()[0] == [0.5, 0.0, 1.0] and data.labels.tolist() == [2, 0, 1]
    cases = {
        "x qid:1 1:0.5\n": ("1", "label 'x'"),
        "1 qid:1 1:0.5\n1 qid:1 1-0.5\n": ("2", "index:value"),
        "1 qid:1 1:0.5\n1 qid:2 1:1\n1 qid:1 1:1\n": ("3", "reappears"),
        "1 qid:1 0:0.5\n": ("1", "positive integer"),
        "1 qid:1 2:abc\n": ("1", "not a number"),
    }
    for i, (text, (line, what)) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.txt"
        path.write_text(text)
        with pytest.raises(DataFormatError, match=what) as err:
            read_svmlight(path)
        assert str(err.value).startswith(f"{path}:{line}:")
    groups = tmp_path / "plain.txt"
    groups.write_text("1 1:1\n0 1:0\n")
    (tmp_path / "plain.txt.query").write_text("3\n")
    with pytest.raises(DataFormatError, match="sum to 3"):
        read_svmlight(groups)


def test_yandex_log_reads_with_the_readme_counts(shared_data):
    log = read_yandex_clicks(shared_data / "click-logs-yandex-wscd-sample" / "trainSample")
    assert len(log.query) == 35064 and len(log.queries) == 20 and log.items.shape == (35064, 10)
    # The README's "sessions with a click at rank k".
    assert log.clicks.sum(0).tolist() == [8999, 8715, 5958, 5385, 3710, 2552, 2409, 1638, 1768, 1569]
    assert int((~log.clicks.any(1)).sum()) >= 11780   # sessions whose only clicks are on unlisted ids count too


def test_yandex_malformed_session_names_line_and_session(tmp_path):
    path = tmp_path / "log"
    path.write_text("1_0\ta,b,c : a; 1_0\ta,b,c :; \n2_0 a,b,c : b; \n")
    with pytest.raises(DataFormatError, match="session 1") as err:
        read_yandex_clicks(path)
    assert str(err.value).startswith(f"{path}:2:")
    path.write_text("1_0\ta,b,c : a; 1_0\ta,b : b\n")
    with pytest.raises(DataFormatError, match="2 results shown, expected 3"):
        read_yandex_clicks(path)


# -- click simulation and propensities --------------------------------------------------------------
def test_oracle_global_propensities_match_the_reference_vectors():
    expected = {5: [1, 0.4166, 0.2941, 0.2439, 0.2168, 0.1999, 0.1883, 0.1799, 0.1734, 0.1683],
                10: [1, 0.3726, 0.2370, 0.1815, 0.1519, 0.1335, 0.1210, 0.1119, 0.1049, 0.0995],
                20: [1, 0.2771, 0.1432, 0.0942, 0.0702, 0.0563, 0.0474, 0.0413, 0.0368, 0.0334]}
    for users, vector in expected.items():
        got = global_propensity(examination(ETA[users]), activity(users))
        assert got.tolist() == pytest.approx(vector, abs=1e-4)
    sessions = allocate_sessions(1_000_000, 40, 10, seed=3)
    empirical = examination(ETA[10])[sessions.user].mean(0)
    assert (empirical - torch.tensor(expected[10], dtype=torch.float64)).abs().max() < 0.005


def test_click_simulator_calibration():
    sim = UserPBMSimulator.from_eta(ETA[10])
    gamma = torch.full((1000, 10), 1.0)
    users = torch.arange(10).repeat(100)
    assert bool(sim.simulate(gamma, users, torch.Generator().manual_seed(0))[:, 0].all())   # y=4 at position 1
    n = 100_000
    gamma = torch.zeros(n, 10)
    gamma[:, 2] = 0.1 + 0.9 * 2 / 4
    clicks = sim.simulate(gamma, torch.full((n,), 3), torch.Generator().manual_seed(1))[:, 2].double()
    p = (1 / 3) ** 1.5 * 0.55
    assert abs(float(clicks.mean()) - p) < 3 * math.sqrt(p * (1 - p) / n)
    assert p == pytest.approx(0.1058, abs=1e-4)


def test_allocator_invariants():
    a = allocate_sessions(20_000, 30, 10, seed=7)
    b = allocate_sessions(20_000, 30, 10, seed=7)
    assert len(a) == 20_000 and torch.equal(a.query, b.query) and torch.equal(a.user, b.user)
    assert ((a.preference > 0).sum(1) == 15).all()
    assert torch.allclose(a.preference.sum(1), torch.ones(10, dtype=torch.float64))
    ratio = activity(10)[:-1] / activity(10)[1:]
    torch.testing.assert_close(ratio, torch.full((9,), 1.25, dtype=torch.float64))
    # Each user issues only its preferred queries.
    assert bool((a.preference[a.user, a.query] > 0).all())


def _randomised_log(theta: torch.Tensor, n_sessions: int, seed: int, user: torch.Tensor | None = None):
    """Sessions that show 10 of a query's 15 documents in random order: PBM is identified."""
    g = torch.Generator().manual_seed(seed)
    n_queries, per_query = 30, 15
    gamma = torch.rand(n_queries * per_query, generator=g, dtype=torch.float64) * 0.8 + 0.1
    query = torch.randint(0, n_queries, (n_sessions,), generator=g)
    shown = torch.argsort(torch.rand(n_sessions, per_query, generator=g), dim=1)[:, :10]
    items = query[:, None] * per_query + shown
    if user is None:
        clicks = PBMSimulator(theta).simulate(gamma[items], generator=g)
    else:
        clicks = UserPBMSimulator(theta).simulate(gamma[items], user, generator=g)
    return items, clicks, n_queries * per_query


def test_em_and_harvesting_recover_pbm_propensities_from_varying_lists():
    theta = examination([1.0])[0]
    items, clicks, n_items = _randomised_log(theta, 20_000, seed=0)
    fitted, _ = fit_pbm_em(items, clicks, n_items, n_iter=100)
    assert (fitted[0] / fitted[0, 0] - theta).abs().max() < 0.03
    assert (harvest_propensity(items, clicks, n_items) - theta).abs().max() < 0.05
    # Per-user EM: two users with different curves share the relevance parameters.
    two = examination([2.0, 0.5])
    user = torch.randint(0, 2, (30_000,), generator=torch.Generator().manual_seed(5))
    items, clicks, n_items = _randomised_log(two, 30_000, seed=1, user=user)
    fitted, _ = fit_pbm_em(items, clicks, n_items, group=user, n_groups=2, n_iter=100)
    assert ((fitted / fitted[:, :1]) - two).abs().max() < 0.04


# -- diversity metrics ------------------------------------------------------------------------------
COV = torch.tensor([[[1, 1, 0], [1, 0, 0], [0, 0, 1]]], dtype=torch.float64)   # d1 {1,2}, d2 {1}, d3 {3}


def test_alpha_dcg_hand_example_and_greedy_ideal():
    ranking = torch.tensor([[0, 1, 2]])
    assert float(alpha_dcg(in_rank_order(COV, ranking), 0.5, 3)) == pytest.approx(2.81546, abs=1e-5)
    ideal = greedy_ideal(COV, 0.5)
    assert ideal.tolist() == [[0, 2, 1]]
    assert float(alpha_dcg(in_rank_order(COV, ideal), 0.5, 3)) == pytest.approx(2.88093, abs=1e-5)
    assert float(alpha_ndcg(COV, ranking, 3)) == pytest.approx(2.81546 / 2.88093, abs=1e-5)


def test_err_ia_and_s_recall_hand_example():
    ranking = torch.tensor([[0, 1, 2]])
    # subtopic 1: 0.5 at rank 1 + 0.5·0.5/2 at rank 2; subtopic 2: 0.5; subtopic 3: 0.5/3 at rank 3
    per_topic = [0.5 + 0.125, 0.5, 0.5 / 3]
    assert float(err_ia(COV, ranking, 3)) == pytest.approx(sum(per_topic) / 3, abs=1e-12)
    # reference weights: share of the 3 candidates covering each subtopic (2/3, 1/3, 1/3), unnormalised
    reference = 2 / 3 * per_topic[0] + 1 / 3 * per_topic[1] + 1 / 3 * per_topic[2]
    assert float(err_ia(COV, ranking, 3, weights="reference")) == pytest.approx(reference, abs=1e-12)
    assert s_recall(COV, ranking, 1).tolist() == pytest.approx([2 / 3])
    assert s_recall(COV, ranking, 3).tolist() == pytest.approx([1.0])


def _brute_force_best(cov: torch.Tensor, k: int, alpha: float) -> float:
    n = cov.shape[1]
    perms = torch.tensor(list(itertools.permutations(range(n))))
    return float(alpha_dcg(in_rank_order(cov.expand(len(perms), -1, -1), perms), alpha, k).max())


def test_greedy_ideal_against_every_permutation_on_small_cases():
    g = torch.Generator().manual_seed(0)
    suboptimal = 0
    trials = 60
    for trial in range(trials):
        n, t = 4 + trial % 3, 3 + trial % 4
        cov = (torch.rand(1, n, t, generator=g) < 0.45).double()
        k = 1 + trial % n
        greedy = float(alpha_dcg(in_rank_order(cov, greedy_ideal(cov, 0.5)), 0.5, k))
        best = _brute_force_best(cov, k, 0.5)
        assert best >= greedy - 1e-12
        if best > greedy + 1e-12:
            suboptimal += 1
            continue
        # Where greedy is the true ideal, α-NDCG of every permutation lies in [0, 1].
        perms = torch.tensor(list(itertools.permutations(range(n))))
        values = alpha_ndcg(cov.expand(len(perms), -1, -1), perms, k, 0.5)
        assert float(values.min()) >= 0 and float(values.max()) <= 1 + 1e-9
    assert suboptimal < trials // 4   # greedy is the ideal on most small cases (the count is printed with -s)
    print(f"greedy ideal below the brute-force ideal on {suboptimal}/{trials} random cases")


def test_alpha_zero_reduces_to_ndcg_over_subtopic_counts():
    g = torch.Generator().manual_seed(1)
    cov = (torch.rand(20, 9, 5, generator=g) < 0.3).double()
    ranking = torch.argsort(torch.rand(20, 9, generator=g), dim=1)
    counts = cov.sum(-1)
    qrels = {str(b): {str(i): int(counts[b, i]) for i in range(9)} for b in range(20)}
    run = {str(b): {str(int(d)): float(9 - r) for r, d in enumerate(ranking[b])} for b in range(20)}
    for k in (3, 5, 9):
        expected = per_query(qrels, run, [f"ndcg@{k}"])[f"ndcg@{k}"]
        got = alpha_ndcg(cov, ranking, k, alpha=0.0)
        for b in range(20):
            assert float(got[b]) == pytest.approx(expected.get(str(b), 0.0), abs=1e-12)


def test_metric_invariances():
    g = torch.Generator().manual_seed(2)
    cov = (torch.rand(8, 7, 4, generator=g) < 0.4).double()
    ranking = torch.argsort(torch.rand(8, 7, generator=g), dim=1)
    # Relabel documents: permute the rows and map the ranking; scores depend only on coverage in rank order.
    perm = torch.argsort(torch.rand(7, generator=g))
    inverse = torch.argsort(perm)
    moved_cov, moved_ranking = cov[:, perm], inverse[ranking]
    for k in (3, 7):
        torch.testing.assert_close(alpha_ndcg(moved_cov, moved_ranking, k), alpha_ndcg(cov, ranking, k))
        torch.testing.assert_close(s_recall(moved_cov, moved_ranking, k), s_recall(cov, ranking, k))
    empty = torch.zeros(1, 5, 3, dtype=torch.float64)
    assert float(alpha_ndcg(empty, torch.arange(5)[None], 5)) == 0.0
    assert float(err_ia(empty, torch.arange(5)[None], 5)) == 0.0


# -- real diversity judgements ------------------------------------------------------------------------
def _err_ia_loop(cov: np.ndarray, k: int) -> float:
    """An independent scalar ERR-IA with uniform intents, for the real-data cross-check."""
    total = 0.0
    for t in range(cov.shape[1]):
        reach, value = 1.0, 0.0
        for j in range(min(k, cov.shape[0])):
            r = 0.5 * cov[j, t]
            value += reach * r / (j + 1)
            reach *= 1 - r
        total += value / cov.shape[1]
    return total


def test_trec_web_diversity_qrels_structure_and_metrics(shared_data):
    folder = shared_data / "trec-web-diversity-qrels"
    qrels = read_trec_diversity_qrels(folder / "qrels.diversity")
    # The README's 249 topic-subtopic pairs count each topic's subtopic-0 (judged non-relevant) lines.
    assert len(qrels.judged) == 50 and sum(len(s) for s in qrels.subtopics.values()) == 249 - 50
    assert sum(len(d) for docs in qrels.judged.values() for d in docs.values()) == 6499
    everything = read_trec_diversity_qrels(folder / "qrels.diversity.all")
    assert len(everything.judged) == 98 and sum(len(s) for s in everything.subtopics.values()) == 449 - 50
    topics = read_trec_topics(folder / "wt09.topics.queries-only")
    assert len(topics) == 50 and topics["1"] == "obama family tree"
    rng = np.random.default_rng(0)
    for topic in ("1", "7", "25", "44"):
        docs = sorted(qrels.judged[topic])
        ranked = [docs[i] for i in rng.permutation(len(docs))[:50]]
        cov = torch.from_numpy(qrels.coverage(topic, ranked))[None]
        ranking = torch.arange(len(ranked))[None]
        value = float(alpha_ndcg(cov, ranking, 20))
        assert 0.0 <= value <= 1.0
        assert float(alpha_ndcg(cov, greedy_ideal(cov, 0.5), 20)) == pytest.approx(1.0)
        assert float(err_ia(cov, ranking, 20)) == pytest.approx(_err_ia_loop(cov[0].numpy(), 20), abs=1e-12)
        # α = 0: nDCG with the number of covered subtopics as the grade (trec_eval-style, same candidates).
        counts = cov[0].sum(-1)
        grades = {d: int(c) for d, c in zip(ranked, counts)}
        run = {d: float(len(ranked) - i) for i, d in enumerate(ranked)}
        expected = per_query({topic: grades}, {topic: run}, ["ndcg@20"])["ndcg@20"][topic]
        assert float(alpha_ndcg(cov, ranking, 20, alpha=0.0)) == pytest.approx(expected, abs=1e-12)


def test_trec_qrels_malformed_line(tmp_path):
    path = tmp_path / "qrels"
    path.write_text("1 2 doc-a 1\n1 x doc-b 1\n")
    with pytest.raises(DataFormatError, match="subtopic 'x'") as err:
        read_trec_diversity_qrels(path)
    assert str(err.value).startswith(f"{path}:2:")


def test_dudiv_label_statistics(shared_data):
    labels = read_dudiv(shared_data / "diversity-du-div-sample" / "query_doc_subtopics_doc15_2.json")
    assert len(labels) == 4473
    assert {len(docs) for docs in labels.values()} == {15}
    assert sum(len(docs) for docs in labels.values()) == 67095
    per_query_topics = [len({t for ts in docs.values() for t in ts}) for docs in labels.values()]
    assert min(per_query_topics) >= 3 and max(per_query_topics) <= 25
    assert np.mean(per_query_topics) == pytest.approx(9.97, abs=0.005)
    assert sum(not ts for docs in labels.values() for ts in docs.values()) == 104


def test_dudiv_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text('{"1": {"1_0": ["2"]},\n "2": {"2_0": "3"}}')
    with pytest.raises(DataFormatError, match="subtopics must be a list") as err:
        read_dudiv(path)
    assert str(err.value).startswith(f"{path}:2:")
    path.write_text('{"1": {"1_0": ["2"]},\n "2": ')
    with pytest.raises(DataFormatError, match="invalid JSON"):
        read_dudiv(path)
