"""GenCRF: aggregation identities, tolerant parsing and fallbacks, weights, the QERM loop and labels."""
import math

import pytest
import torch

from datamodules.gencrf import GenCRFDataModule, QERMDataModule, read_qerm_rows
from datamodules.readers import DataFormatError
from zoo.gencrf.aggregation import (
    aggregate,
    chosen_round,
    dc_text,
    fw_weights,
    median,
    qerm_labels,
    scoredw_weights,
    simdw_weights,
)
from zoo.gencrf.module import MODES, GenCRFModule
from zoo.gencrf.parsing import cluster_fallback, parse_clusters, parse_scores
from zoo.gencrf.qerm import QERMModule, binary_auc

TINY = {"llm": "tiny-llama", "max_new_tokens": 6, "cluster_max_new_tokens": 8, "score_max_new_tokens": 4}


@pytest.fixture(scope="module")
def data():
    dm = GenCRFDataModule(synthetic={"docs_per_topic": 10}, seed=0)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def module(data):
    m = GenCRFModule(mode="scoredw", **TINY).eval()
    m.prepare_index(data.retrieval_data("test"))
    return m


def ranking(run):
    return [d for d, _ in sorted(run.items(), key=lambda kv: (-kv[1], kv[0]))]


def search(module, vectors, qids):
    return {q: ranking(r) for q, r in module.retrieve(qids, vectors).items()}


def test_datamodule_holds_apart_a_seeded_split(data):
    assert len(data.eval_qids) == 20 and len(data.train_qids) == 40 and len(data.data.corpus) == 100
    assert not set(data.eval_qids) & set(data.train_qids)
    again = GenCRFDataModule(synthetic={"docs_per_topic": 10}, seed=0, max_eval_queries=5)
    again.setup()
    assert again.eval_qids == data.eval_qids[:5]


# -- aggregation identities ---------------------------------------------------------------------
def _case(module, data):
    qids = data.eval_qids[:4]
    queries = [data.data.queries[q] for q in qids]
    finals = [[f"{q} alpha beta", f"{q.split()[0]} gamma", "unrelated words here"] for q in queries]
    return qids, queries, finals


def test_filter_all_reduces_to_the_baseline(module, data):
    qids, queries, finals = _case(module, data)
    base = search(module, module.query_vectors("q_init", queries, finals, [None] * 4)[0], qids)
    low = [[10.0, 20.0, 59.9]] * 4
    vectors, weights = module.query_vectors("scoredw", queries, finals, low)
    assert all(w == [0.0, 0.0, 0.0] for w in weights)
    assert search(module, vectors, qids) == base
    module.hparams.sim_threshold = 1.01
    try:
        assert search(module, module.query_vectors("simdw", queries, finals, [None] * 4)[0], qids) == base
    finally:
        module.hparams.sim_threshold = 0.2


def test_scale_invariance_of_the_weights(module, data):
    qids, queries, finals = _case(module, data)
    e = module.retriever.encode([queries[0], *finals[0]])
    w = [0.9, 0.0, 0.65]
    a = aggregate(e[0], e[1:], 0.7, w)
    b = aggregate(e[0], e[1:], 0.7 * 3.5, [3.5 * x for x in w])
    assert search(module, a[None], qids[:1]) == search(module, b[None], qids[:1])
    assert not torch.allclose(a, b)


def test_fixed_weights_sanity(module, data):
    qids, queries, finals = _case(module, data)
    for k in (1, 2, 3):
        assert math.isclose(0.7 + sum(fw_weights(0.7, k)), 1.0)
    base = search(module, module.query_vectors("q_init", queries, finals, [None] * 4)[0], qids)
    module.hparams.w0 = 1.0
    try:
        assert search(module, module.query_vectors("fw", queries, finals, [None] * 4)[0], qids) == base
        module.hparams.w0 = 0.0
        single = [f[:1] for f in finals]
        only_first = search(module, module.retriever.encode([f[0] for f in finals]), qids)
        assert search(module, module.query_vectors("fw", queries, single, [None] * 4)[0], qids) == only_first
    finally:
        module.hparams.w0 = 0.7


def test_simdw_weights_and_threshold_boundary():
    assert simdw_weights([0.2, 0.2 - 1e-9, 0.95, -0.3], 0.2) == [0.2, 0.0, 0.95, 0.0]
    kept = [w for w in simdw_weights([0.1, 0.25, 0.6, 1.0], 0.2) if w > 0]
    assert all(0.2 <= w <= 1.0 for w in kept)


def test_simdw_module_weights_lie_in_threshold_to_one(module, data):
    _, queries, finals = _case(module, data)
    _, weights = module.query_vectors("simdw", queries, finals, [None] * 4)
    assert all(w == 0.0 or 0.2 <= w <= 1.0 + 1e-6 for row in weights for w in row)
    assert any(w > 0 for row in weights for w in row)


def test_dc_string():
    assert dc_text("q", ["a", "b"]) == "q [SEP] a [SEP] b [SEP]"


def test_score_parsing_and_thresholding():
    assert parse_scores("[75, 40, 90]") == [75.0, 40.0, 90.0]
    assert scoredw_weights(parse_scores("[75, 40, 90]"), 3, 60, 100) == [0.75, 0.0, 0.9]
    assert scoredw_weights(parse_scores("Scores: [80]"), 3, 60, 100) == [0.8, 0.0, 0.0]
    assert scoredw_weights(None, 2) == [0.0, 0.0]
    assert scoredw_weights([60, 59.99], 2) == [0.6, 0.0]
    assert parse_scores("cluster1 gets 70 and cluster2 gets 250") == [70.0, 100.0]
    assert parse_scores("no numbers at all") is None


# -- clustering: parsing, fallback, cardinality -------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ('{"cluster1": "a b", "cluster2": "c"}', ["a b", "c"]),
    ("```json\n{'cluster1': 'x', 'cluster2': 'y', 'cluster3': 'z', 'cluster4': 'w'}\n```", ["x", "y", "z"]),
    ('Sure! {"cluster2": "second", "cluster1": "first"} hope this helps', ["first", "second"]),
    ('{"cluster1": "one", "cluster2": "", "cluster3": "three"', ["one", "three"]),
    ("Cluster 1: solar panels efficiency\nCluster 2: solar cell cost", ["solar panels efficiency",
                                                                       "solar cell cost"]),
    ('{"cluster1": ["a", "b"], "cluster2": "a b"}', ["a b"]),
])
def test_parse_clusters_is_tolerant(text, expected):
    assert parse_clusters(text, 3) == expected


@pytest.mark.parametrize("text", ["", "random words without structure", "{}", '{"cluster1": ""}', "[1, 2]"])
def test_parse_clusters_gives_none_on_unusable_output(text):
    assert parse_clusters(text) is None


def test_cluster_fallback_groups():
    texts = ["a", "b", "c", "d", "e", "f"]
    emb = torch.tensor([[1.0, 0, 0], [0.99, 0.1, 0], [0, 1.0, 0], [0.1, 0.99, 0], [0, 0, 1.0], [0, 0.1, 0.99]])
    groups = cluster_fallback(texts, emb, 3)
    assert groups == [[0, 1], [2, 3], [4, 5]]
    assert cluster_fallback(texts, torch.ones(6, 3), 3) == [list(range(6))]


def test_cluster_cardinality_and_generation_count(module, data):
    qid = data.eval_qids[0]
    generated = module.reformulate(qid, data.data.queries[qid])
    assert len(generated) == 3 * 2
    before = module.fallbacks["cluster"]
    finals = module.cluster([data.data.queries[qid]] * 2, [generated, ["", ""]])
    assert all(1 <= len(f) <= 3 for f in finals)
    assert module.fallbacks["cluster"] == before + 2   # a random LLM never writes the JSON: logged fallback
    assert finals[1] == [data.data.queries[qid]]


def test_score_fallback_is_similarity_based(module):
    scores = module.fallback_scores("alpha beta", ["alpha beta", "gamma delta"])
    assert scores[0] == 100.0 and scores[1] < 100.0


# -- determinism ------------------------------------------------------------------------------
def test_fixed_seed_gives_identical_texts_weights_and_rankings(module, data):
    qids = data.eval_qids[:3]
    queries = [data.data.queries[q] for q in qids]
    together = module.run_round(qids, queries, 0, ["scoredw", "simdw"])
    other = GenCRFModule(mode="scoredw", **TINY).eval()
    other.load_state_dict(module.state_dict())   # same weights; only the batching differs
    other.prepare_index(data.retrieval_data("test"))
    alone = [other.run_round([q], [t], 0, ["scoredw", "simdw"])[0] for q, t in zip(qids, queries)]
    for a, b in zip(together, alone):
        assert a["generated"] == b["generated"] and a["finals"] == b["finals"]
        assert a["weights"] == b["weights"]
        assert ranking(a["runs"]["scoredw"]) == ranking(b["runs"]["scoredw"])
    assert module.run_round(qids[:1], queries[:1], 1)[0]["generated"] != together[0]["generated"]


def test_oracle_vector_places_the_document_first(module, data):
    qid = data.eval_qids[0]
    target = max(data.data.qrels[qid], key=data.data.qrels[qid].get)
    vector = module.retriever.encode([data.data.doc_text(target)])
    run = module.retrieve([qid], vector)[qid]
    assert ranking(run)[0] == target and module.ndcg(qid, run)["ndcg@10"] > 0


# -- QERM -------------------------------------------------------------------------------------
def test_qerm_labels_and_median_tau():
    values = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2]
    tau = median(values)
    labels = qerm_labels(values, tau)
    assert labels == [int(v >= tau) for v in values] and sum(labels) == 3


def test_chosen_round_rule():
    assert chosen_round([0.5], 0.0) == 0
    assert chosen_round([-1.0, 0.2], 0.0) == 1
    assert chosen_round([-0.1, -0.5], 0.0) == 0 and chosen_round([-0.1, -0.5], 0.0, "last") == 1


@pytest.fixture(scope="module")
def qerm_module(data):
    m = GenCRFModule(mode="scoredw_ft_qerm", qerm_rounds=3, **TINY).eval()
    m.prepare_index(data.retrieval_data("test"))
    first = m.run_round(data.eval_qids[:6], [data.data.queries[q] for q in data.eval_qids[:6]], 0, ["scoredw_ft"])
    for row, z in zip(first, m.qerm_logits([r["query"] for r in first], [r["finals"] for r in first])):
        row["qerm_logit"] = z
    return m, first


def test_qerm_loop_bounds(qerm_module):
    m, first = qerm_module
    assert all(len(h) == 1 for h in m.qerm_loop(first, -math.inf))
    assert all(len(h) == 3 for h in m.qerm_loop(first, math.inf))
    mean = sum(r["qerm_logit"] for r in first) / len(first)
    history = m.qerm_loop(first, mean)
    regenerated = sum(len(h) > 1 for h in history) / len(history)
    assert regenerated == sum(r["qerm_logit"] < mean for r in first) / len(first)
    assert all(1 <= len(h) <= 3 for h in history)


def test_qerm_classifier_trains_and_scores():
    import lightning as L

    dm = QERMDataModule(gencrf={**TINY, "mode": "scoredw_ft"},
                        gencrf_data={"synthetic": {"docs_per_topic": 10}, "eval_fraction": 0.5})
    model = QERMModule(optimizer={"name": "AdamW", "lr": 1e-3})
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    labels = [r["label"] for r in dm.train_rows + dm.val_rows]
    assert 0 < sum(labels) < len(labels)
    assert {"val/auc", "val/accuracy", "val/regenerated_fraction"} <= set(trainer.callback_metrics)
    assert len(model.score(["q"], [["a", "b"]])) == 1
    assert binary_auc(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])) == 1.0


def test_qerm_rows_file_errors_name_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"query": "q", "finals": ["a"], "ndcg@10": 0.5}\n{"query": "q", "finals": "a"}\n')
    with pytest.raises(DataFormatError, match="rows.jsonl:2"):
        read_qerm_rows(path)


def test_bad_config_values_are_named():
    for bad in ({"mode": "nope"}, {"prompts": ["unknown_prompt"]}, {"qerm_rounds": 0}):
        with pytest.raises(ValueError, match="model."):
            GenCRFModule(**TINY, **bad)
    assert "q_init" in MODES


def test_expected_scores_from_label_logprobs(module):
    module.hparams.score_source = "expected"
    try:
        scores = module.score(["alpha beta", "gamma"], [["alpha beta delta", "beta"], ["gamma rays"]])
    finally:
        module.hparams.score_source = "generate"
    assert [len(s) for s in scores] == [2, 1]
    assert all(10.0 <= s <= 100.0 for row in scores for s in row)


def test_qerm_mode_under_trainer_test_logs_epsilon_and_bounded_rounds():
    import lightning as L

    dm = GenCRFDataModule(synthetic={"docs_per_topic": 10}, max_eval_queries=4, batch_size=2)
    model = GenCRFModule(mode="scoredw_ft_qerm", compare_modes=["fw"], **TINY)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = model.test_metrics
    assert 1.0 <= metrics["test/rounds"] <= 2.0
    assert "test/epsilon" in trainer.callback_metrics and "test/compare/fw/ndcg@10" in metrics
    assert 0.0 <= metrics["test/ndcg@10"] <= 1.0 and metrics["test/llm_calls"] >= 8
