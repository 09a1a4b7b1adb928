"""Utility-focused annotation: the multi-positive losses, the annotation prompts/parsers/pipeline, the
multi-positive datamodule (mixture, corruption, groups) and the module on tiny-bert."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from datamodules.utility_annotation import UtilityAnnotationDataModule
from zoo.dense.module import DenseRetrieverModule
from zoo.utility_annotation.annotator import (
    Candidates,
    CausalLMBackend,
    MockBackend,
    UtilityAnnotator,
    parse_ranking,
    parse_selection,
    read_annotations,
    relevance_messages,
    utility_selection_messages,
)
from zoo.utility_annotation.losses import (
    MultiPositiveContrastiveLoss,
    conj_infonce,
    disj_infonce,
    group_target,
    single_infonce,
)
from zoo.utility_annotation.module import UtilityRetrieverModule

SYNTHETIC = {"super_topics": 2, "topics_per_super": 2, "docs_per_topic": 10, "queries_per_topic": 5}
TINY = {"backbone": "tiny-bert", "max_doc_length": 48, "encode_batch_size": 16}


def _random_case(seed=0, rows=6, cols=10):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, cols, generator=g) * 3
    target = torch.rand(rows, cols, generator=g) < 0.3
    target[:, 0] = True
    return scores, target


# -- losses ------------------------------------------------------------------------------------
def test_with_one_positive_per_row_all_three_losses_are_infonce():
    scores = torch.randn(5, 12)
    positive = torch.tensor([0, 3, 7, 11, 2])
    target = F.one_hot(positive, 12).bool()
    expected = F.cross_entropy(scores, positive)
    for loss in (disj_infonce(scores, target), conj_infonce(scores, target), conj_infonce(scores, target, "mean"),
                 single_infonce(scores, target)):
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


def test_disj_below_best_single_positive_below_conj_row_by_row():
    scores, target = _random_case()
    for row in range(scores.shape[0]):
        s, t = scores[row:row + 1], target[row:row + 1]
        singles = [F.cross_entropy(s, torch.tensor([c])) for c in t[0].nonzero().flatten().tolist()]
        assert disj_infonce(s, t) <= min(singles) + 1e-6
        assert min(singles) <= max(singles) <= conj_infonce(s, t) + 1e-6


def test_disj_matches_the_naive_formula_and_survives_extreme_scores():
    scores, target = _random_case(1)
    naive = -torch.log((torch.softmax(scores, 1) * target).sum(1)).mean()
    torch.testing.assert_close(disj_infonce(scores, target), naive, atol=1e-6, rtol=1e-6)
    stable = torch.logsumexp(scores, 1) - torch.logsumexp(scores.masked_fill(~target, -math.inf), 1)
    torch.testing.assert_close(disj_infonce(scores, target), stable.mean(), atol=1e-6, rtol=1e-6)
    extreme = torch.tensor([[1e4, -1e4, 0.0, -1e4], [-1e4, -1e4, 1e4, 0.0]], requires_grad=True)
    mask = torch.tensor([[False, True, False, True], [True, False, False, False]])
    for loss in (disj_infonce(extreme, mask), conj_infonce(extreme, mask), single_infonce(extreme, mask)):
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(extreme.grad).all()
        extreme.grad = None


def test_disj_leaves_a_low_scoring_positive_alone_while_conj_pushes_it():
    target = torch.tensor([[True, True, False]])
    grads = {}
    for name, fn in (("disj", disj_infonce), ("conj", conj_infonce)):
        scores = torch.tensor([[5.0, -5.0, 0.0]], requires_grad=True)
        fn(scores, target).backward()
        grads[name] = scores.grad[0]
    p = torch.softmax(torch.tensor([5.0, -5.0, 0.0]), 0)
    assert grads["disj"][1].abs() < 0.01
    assert abs(grads["conj"][1].item() + 1.0) < 0.01
    torch.testing.assert_close(grads["disj"][2], p[2])
    torch.testing.assert_close(grads["conj"][2], 2 * p[2])


@pytest.mark.parametrize("fn", [disj_infonce, conj_infonce, single_infonce])
def test_rows_without_a_positive_are_skipped(fn):
    scores, target = _random_case(2)
    with_empty = torch.cat([scores, torch.randn(2, scores.shape[1])])
    empty_target = torch.cat([target, torch.zeros(2, target.shape[1], dtype=torch.bool)])
    torch.manual_seed(0)
    kept = fn(scores, target)
    torch.manual_seed(0)
    torch.testing.assert_close(fn(with_empty, empty_target), kept)
    nothing = torch.randn(3, 5, requires_grad=True)
    loss = fn(nothing, torch.zeros(3, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(nothing.grad).all()


def test_other_groups_positives_are_negatives_and_labels_land_in_their_own_group():
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
    assert group_target(labels, 12, offset=6).nonzero().tolist() == [[0, 6], [0, 8], [1, 10]]
    # with simulated world size 2 (2 queries per rank), each rank's loss over the gathered documents
    # averages to the single-process loss on the concatenated batch
    torch.manual_seed(0)
    q, d = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(12, 8), dim=1)
    all_labels = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 1]])
    loss = MultiPositiveContrastiveLoss("disj", temperature=0.1)
    whole = loss(q, d, all_labels)
    per_rank = [loss.from_scores(q[2 * r:2 * r + 2] @ d.T / 0.1, group_target(all_labels[2 * r:2 * r + 2], 12, 6 * r))
                for r in range(2)]
    torch.testing.assert_close(whole, torch.stack(per_rank).mean())
    # query 0 scores query 1's positive as a negative: raising it raises query 0's loss
    boosted = d.clone()
    boosted[4] = q[0]
    assert loss(q[:1], boosted[:3], all_labels[:1]) == loss(q[:1], d[:3], all_labels[:1])
    assert loss(q[:2], boosted[:6], all_labels[:2]) > loss(q[:2], d[:6], all_labels[:2])


def test_shuffling_a_group_with_its_labels_leaves_disj_unchanged():
    torch.manual_seed(0)
    q, d = torch.randn(2, 8), torch.randn(8, 8)
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]])
    loss = MultiPositiveContrastiveLoss("disj", temperature=1.0)
    perm = torch.tensor([2, 0, 3, 1])
    d2 = torch.cat([d[:4][perm], d[4:][perm]])
    labels2 = torch.stack([labels[0][perm], labels[1][perm]])
    torch.testing.assert_close(loss(q, d, labels), loss(q, d2, labels2))


# -- parsers and prompts --------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("My selection:[[1],[3]].", [1, 3]),
    ("My selection: [1], [3]", [1, 3]),
    ("My selection:[[3],[1],[3],[9],[0]].", [1, 3]),
    ("<think>maybe [2] and [4]</think>My selection:[[4]].", [4]),
    ("<think>still thinking about [2]", []),
    ("", []),
    ("I cannot decide.", []),
    ("My selection: 2, 3", [2, 3]),
])
def test_selection_parser(text, expected):
    assert parse_selection(text, 5) == expected


def test_ranking_parser_appends_missing_and_drops_duplicates():
    assert parse_ranking("[2] > [1] > [3]", 4) == [2, 1, 3, 4]
    assert parse_ranking("[2] > [2] > [7] > [4]", 4) == [2, 4, 1, 3]
    assert parse_ranking("garbage", 3) == [1, 2, 3]


def test_selection_prompt_has_one_turn_pair_per_truncated_passage_and_the_instruction_last():
    passages = ["word " * 400, "short passage"]
    messages = utility_selection_messages("what?", passages, "an answer")
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant"] * 3 + ["user"]
    assert messages[2]["content"].startswith("[1] ") and len(messages[2]["content"].split()) == 301
    assert messages[3]["content"] == "Received passage [1]." and messages[5]["content"] == "Received passage [2]."
    assert "My selection:[[i],[j],...]" in messages[-1]["content"] and "an answer" in messages[-1]["content"]
    assert "My selection" in relevance_messages("q", passages)[-1]["content"]


# -- the pipeline --------------------------------------------------------------------------------
class Recording(MockBackend):
    def generate(self, requests):
        self.requests = getattr(self, "requests", []) + list(requests)
        return super().generate(requests)


@pytest.fixture(scope="module")
def datamodule():
    dm = UtilityAnnotationDataModule(label_source="human", synthetic=SYNTHETIC, group_size=6, batch_size=4,
                                     candidate_pool=10)
    dm.setup("fit")
    return dm


def _items(dm, n=6):
    qids, _ = dm._split(dm.data)
    return [Candidates(q, dm.data.queries[q], *dm.candidate_pool(q)) for q in qids[:n]]


def test_pipeline_nests_utility_in_relevance_in_candidates(datamodule):
    backend = Recording(noise_rate=0.5)
    records = UtilityAnnotator(backend).run(_items(datamodule))
    assert any(r["relevance_ids"] for r in records) and any(r["utility_ids"] for r in records)
    for r in records:
        assert set(r["utility_ids"]) <= set(r["relevance_ids"]) <= set(r["candidate_ids"])
        assert sorted(r["utility_ranking"]) == sorted(r["relevance_ids"])
    answer_requests = [req for req in backend.requests if req.step == "pseudo_answer"]
    texts = {d: datamodule.data.doc_text(d) for r in records for d in r["candidate_ids"]}
    for req, r in zip(answer_requests, records):
        shown = r["relevance_ids"] or r["candidate_ids"]
        assert req.passages == [texts[d] for d in shown]
        assert all(f"[{i}]" in req.messages[0]["content"] for i in range(1, len(shown) + 1))


def test_annotation_file_resumes_where_it_stopped(datamodule, tmp_path):
    items = _items(datamodule)
    out = tmp_path / "ann.jsonl"
    UtilityAnnotator(MockBackend(), batch_size=2).run(items[:3], out)
    backend = Recording()
    records = UtilityAnnotator(backend, batch_size=2).run(items, out)
    assert [r["query_id"] for r in records] == [c.query_id for c in items]
    assert {req.query for req in backend.requests} == {c.query for c in items[3:]}
    assert len(read_annotations(out)) == len(items)
    out.write_text(out.read_text() + '{"query_id": "cut mid-wri')  # a killed writer's partial line
    assert len(UtilityAnnotator(MockBackend()).run(items, out)) == len(items)
    assert out.read_text().endswith("}\n")
    out.write_text(out.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"ann.jsonl:7"):
        read_annotations(out)


def test_a_causal_lm_backend_annotates_through_the_same_pipeline(datamodule):
    backend = CausalLMBackend("tiny-llama", max_new_tokens=6, answer_tokens=6, batch_size=4)
    records = UtilityAnnotator(backend, passage_words=20).run(_items(datamodule, 2))
    assert len(records) == 2 and all(r["model"] == "tiny-llama" for r in records)
    assert all(set(r["relevance_ids"]) <= set(r["candidate_ids"]) for r in records)


# -- the datamodule ------------------------------------------------------------------------------
def test_groups_put_positives_first_and_never_use_a_labelled_positive_as_negative(datamodule):
    dm = datamodule
    for row in dm.train_rows:
        assert len(row["docs"]) == 6 and len(row["labels"]) == 6
        n = sum(row["labels"])
        assert row["labels"] == [1] * n + [0] * (6 - n)
        assert not set(row["doc_ids"][n:]) & set(dm.positives[row["qid"]])
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == (4, 6) and len(batch["docs"]) == 24


def test_mixture_labels_exactly_the_human_fraction_and_curriculum_serves_llm_first():
    dm = UtilityAnnotationDataModule(label_source="mixture", human_fraction=0.2, synthetic=SYNTHETIC,
                                     group_size=6, batch_size=2, mock_annotator={"noise_rate": 0.3})
    dm.setup("fit")
    train_qids, _ = dm._split(dm.data)
    assert sum(o == "human" for o in dm.origin.values()) == round(0.2 * len(train_qids))
    origins = [o for batch in dm.train_dataloader() for o in [dm.origin[q] for q in batch["qid"]]]
    first_human = origins.index("human")
    assert "llm" not in origins[first_human:] and first_human > 0
    again = UtilityAnnotationDataModule(label_source="mixture", human_fraction=0.2, synthetic=SYNTHETIC,
                                        group_size=6, batch_size=2)
    again.setup("fit")
    assert {q for q, o in again.origin.items() if o == "human"} == {q for q, o in dm.origin.items() if o == "human"}


def test_corruption_adds_the_exact_share_of_false_positives_from_non_relevant_documents():
    dm = UtilityAnnotationDataModule(label_source="human", corrupt_fraction=0.3, synthetic=SYNTHETIC,
                                     group_size=8, batch_size=2)
    dm.setup("fit")
    n_false = sum(len(v) for v in dm.false_positives.values())
    n_all = sum(len(v) for v in dm.positives.values())
    assert n_false == round(0.3 / 0.7 * (n_all - n_false))
    for qid, wrong in dm.false_positives.items():
        assert all(dm.data.qrels[qid].get(d, 0) <= 0 and d in dm.positives[qid] for d in wrong)


def test_llm_annotation_file_is_the_label_source(datamodule, tmp_path):
    out = tmp_path / "ann.jsonl"
    UtilityAnnotator(MockBackend()).run(_items(datamodule, 8), out)
    dm = UtilityAnnotationDataModule(label_source="llm_utility_selection", annotations=str(out),
                                     synthetic=SYNTHETIC, group_size=6, batch_size=2)
    dm.setup("fit")
    records = read_annotations(out)
    assert {r["qid"] for r in dm.train_rows} <= {q for q, r in records.items() if r["utility_ids"]}
    for row in dm.train_rows:
        assert set(row["doc_ids"][: sum(row["labels"])]) <= set(records[row["qid"]]["utility_ids"])


# -- the module ----------------------------------------------------------------------------------
def test_module_with_single_positive_labels_equals_the_dense_infonce():
    torch.manual_seed(0)
    base = DenseRetrieverModule(**TINY).eval()
    docs = [f"doc {i} about topic {i % 3}" for i in range(8)]
    batch = {"query": ["topic 0", "topic 1"], "docs": docs, "positive": torch.tensor([1, 2])}
    expected = base.compute_losses(batch)["loss"]
    for loss in ("disj", "conj", "infonce_single"):
        module = UtilityRetrieverModule(loss=loss, **TINY).eval()
        module.load_state_dict(base.state_dict(), strict=False)
        labels = F.one_hot(batch["positive"], 4).float()
        torch.testing.assert_close(module.compute_losses({**batch, "labels": labels})["loss"], expected)
        torch.testing.assert_close(module.compute_losses(batch)["loss"], expected)


def test_module_trains_on_multi_positive_batches_and_round_trips(datamodule, tmp_path):
    module = UtilityRetrieverModule(loss="conj", conj_reduction="mean", **TINY)
    batch = next(iter(datamodule.train_dataloader()))
    losses = module.compute_losses(batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and losses["positives_per_query"] >= 1
    module.save_pretrained(tmp_path / "m")
    loaded = UtilityRetrieverModule.from_pretrained(tmp_path / "m")
    assert loaded.hparams.loss == "conj" and loaded.multi_positive.conj_reduction == "mean"
    assert json.loads(json.dumps(dict(loaded.hparams)))["max_doc_length"] == 48
