"""CLUE (usefulness_labels): cascade, votes, parsing, prompts, metrics, satisfaction, data."""
import json
import random
import re

import lightning as L
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import cohen_kappa_score

from datamodules.readers import DataFormatError
from datamodules.usefulness import (
    SatisfactionDataModule,
    UsefulnessDataModule,
    generate_sessions,
    read_sessions,
)
from zoo.usefulness_labels import (
    CLUEModule,
    SatisfactionPredictor,
    agreement,
    cohen_kappa,
    majority,
    parse_bracket_ids,
    parse_level,
    run_cascade,
)
from zoo.usefulness_labels.cascade import StageAnswer
from zoo.usefulness_labels.module import ANCHOR_INTRO

LEVELS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def queries():
    return generate_sessions(num_queries=16, levels=LEVELS, seed=3)


class ScriptedJudge(CLUEModule):
    """A setwise judge whose replies come from ``self.script(prompt, greedy) -> str``; records every prompt."""

    def generate(self, prompts, *, greedy=False, max_new_tokens=None):
        self.prompts += [(p, greedy) for p in prompts]
        return [self.script(p, greedy) for p in prompts]


def Scripted(script, **kwargs) -> ScriptedJudge:
    judge = ScriptedJudge(**{"stage_classifier": "setwise_generate", **kwargs})
    judge.script, judge.prompts = script, []
    return judge


def shown_count(prompt: str) -> int:
    return int(re.search(r"I will give you (\d+) documents", prompt).group(1))


def flat(labels):
    return [v for row in labels for v in row]


def gold_of(rows):
    return [d["usefulness"] for q in rows for d in q["docs"]]


# -- the cascade ---------------------------------------------------------------------------------
def test_every_document_gets_exactly_one_label_in_the_level_set(queries):
    torch.manual_seed(0)
    out = CLUEModule(levels=LEVELS).label(queries)
    assert [len(row) for row in out["labels"]] == [len(q["docs"]) for q in queries]
    assert set(flat(out["labels"])) <= set(LEVELS)
    four = CLUEModule(levels=[1, 2, 3, 4], stage_classifier="oracle").label(
        generate_sessions(num_queries=8, levels=[1, 2, 3, 4], seed=1))
    assert set(flat(four["labels"])) <= {1, 2, 3, 4}


def test_cascade_nesting_and_anchors_are_the_previous_stage_choices():
    rng = random.Random(0)
    sizes = [5, 3, 1, 4]
    seen = []

    def decide(level, requests):
        seen.append((level, requests))
        return [StageAnswer([rng.randint(0, 5) for _ in r.candidates]) for r in requests]

    result = run_cascade(sizes, LEVELS, decide, threshold=3)
    for q in range(len(sizes)):
        stages = result.stages[q]
        for before, after in zip(stages, stages[1:]):
            assert set(after.candidates) <= set(before.candidates)           # U_{k-1} subset of U_k
            chosen = [d for d, v in zip(before.candidates, result.answers[q][stages.index(before)].votes) if v >= 3]
            assert not set(chosen) & set(after.candidates)                  # labelled docs never reappear
            assert sorted(after.anchors) == sorted(d for d, y in enumerate(result.labels[q]) if y == before.level)
        assert stages[0].anchors == []
    assert [level for level, _ in seen] == sorted({level for level, _ in seen}, reverse=True)


def test_oracle_cascade_reproduces_gold_and_kappa_is_one(queries):
    out = CLUEModule(levels=LEVELS, stage_classifier="oracle").label(queries)
    assert flat(out["labels"]) == gold_of(queries)
    metrics = agreement(flat(out["labels"]), gold_of(queries), LEVELS)
    assert metrics["kappa"] == 1.0 and metrics["weighted_kappa"] == 1.0 and metrics["mae"] == 0.0


class ScoreJudge(CLUEModule):
    """g_k = 1[s > t_k] with s a fixed score per document (read back from the prompt)."""

    scores: dict = {}

    def stage_margins(self, prompts):
        return torch.tensor([self.scores[re.search(r"Text: (\S+)", p).group(1)] for p in prompts])


def score_rows(values):
    docs = [{"doc_id": f"d{i}", "title": "", "snippet": "", "text": f"doc{i}", "rank": i + 1, "click_order": i + 1,
             "dwell": 10.0, "usefulness": 0, "behaviour": "b", "history": "h"} for i in range(len(values))]
    return [{"qid": "q", "task": "t", "query": "q", "docs": docs}], {f"doc{i}": v for i, v in enumerate(values)}


def test_score_thresholds_give_the_ordinal_discretisation():
    values = [-3.0, -0.5, 0.2, 1.4, 2.7, 5.0, 0.9]
    rows, scores = score_rows(values)
    t = [-1.0, 0.5, 1.0, 2.0]          # for levels 1..4
    judge = ScoreJudge(levels=LEVELS, vote_sampling=False, thresholds=t, use_anchors=False)
    judge.scores = scores
    labels = judge.label(rows)["labels"][0]
    assert labels == [sum(v > tk for tk in t) for v in values]


def test_always_true_and_always_false_judges_and_their_call_counts(queries):
    voters = 5
    yes = Scripted(lambda p, g: "".join(f"[{j}]" for j in range(1, shown_count(p) + 1)), levels=LEVELS, voters=voters)
    out = yes.label(queries)
    assert set(flat(out["labels"])) == {4}
    assert out["calls"] == [voters] * len(queries)
    no = Scripted(lambda p, g: "I think none of them. []", levels=LEVELS, voters=voters)
    out = no.label(queries)
    assert set(flat(out["labels"])) == {0}
    assert out["calls"] == [(len(LEVELS) - 1) * voters] * len(queries)


def test_voting_needs_three_of_five_and_one_voter_is_clue_s():
    rows, _ = score_rows([0.0, 0.0])
    assert (majority(5), majority(1), majority(3)) == (3, 1, 2)
    replies = iter(["[1][2]", "[1]", "[1][2]", "[]", "x [2]... final: []"] * 4)
    judge = Scripted(lambda p, g: next(replies), levels=[0, 1], voters=5)
    out = judge.label(rows)
    assert out["labels"][0] == [1, 0]                           # doc 1: 3 votes, doc 2: 2 votes
    assert [v["1"] for v in out["votes"][0]] == [3, 2]          # logged counts = selections in the replies
    assert len(out["replies"][0]["1"]) == 5
    single = Scripted(lambda p, g: "[2]", levels=[0, 1], voters=1)
    assert single.label(rows)["labels"][0] == [0, 1]
    assert single.threshold == 1


def test_pointwise_logit_is_permutation_invariant(queries):
    torch.manual_seed(0)
    judge = CLUEModule(levels=LEVELS, stage_classifier="pointwise_logit")
    before = judge.label(queries)["labels"]
    shuffled = []
    for q in queries:
        docs = list(q["docs"])
        random.Random(q["qid"]).shuffle(docs)
        shuffled.append({**q, "docs": docs})
    assert any([d["doc_id"] for d in a["docs"]] != [d["doc_id"] for d in b["docs"]] for a, b in zip(queries, shuffled))
    after = judge.label(shuffled)["labels"]
    by_id = lambda rows, labels: {d["doc_id"]: y for q, ys in zip(rows, labels) for d, y in zip(q["docs"], ys)}
    assert by_id(queries, before) == by_id(shuffled, after)


def test_raising_thresholds_never_raises_labels(queries):
    torch.manual_seed(0)
    judge = CLUEModule(levels=LEVELS, use_anchors=False)       # anchors would tie documents together
    base = flat(judge.label(queries)["labels"])
    judge.hparams.thresholds = [0.0, 0.0, 0.0, 0.5]
    top_raised = flat(judge.label(queries)["labels"])
    assert top_raised.count(4) <= base.count(4)
    judge.hparams.thresholds = 0.7
    raised = flat(judge.label(queries)["labels"])
    assert all(r <= b for r, b in zip(raised, base))
    judge.hparams.thresholds = -0.7
    lowered = flat(judge.label(queries)["labels"])
    assert all(r >= b for r, b in zip(lowered, base)) and lowered != raised


def test_ablation_switches_remove_behaviour_and_anchor_turns(queries):
    def first_doc_twice(p, g):
        return "[1]" if shown_count(p) > 1 else "[]"

    full = Scripted(first_doc_twice, levels=LEVELS, voters=1)
    full.label(queries)
    text = "\n".join(p for p, _ in full.prompts)
    assert "Behaviour:" in text and ANCHOR_INTRO.format(level=4) in text and "Information need:" in text
    bare = Scripted(first_doc_twice, levels=LEVELS, voters=1, use_behaviour=False, use_anchors=False,
                    use_context=False)
    bare.label(queries)
    text = "\n".join(p for p, _ in bare.prompts)
    assert "Behaviour:" not in text and "already judged" not in text and "Information need:" not in text


# -- parsing -------------------------------------------------------------------------------------
def test_bracket_parser():
    assert parse_bracket_ids("I think [2] is good.\nAnswer: [1][3][3][9]", 4) == [1, 3]
    assert parse_bracket_ids("[2] looks thin, so: [4], [1]", 4) == [4, 1]
    assert parse_bracket_ids("none qualify: []", 4) == []
    assert parse_bracket_ids("[2], [ 4 ]", 4) == [2, 4]
    assert parse_bracket_ids("documents one and two", 4) is None
    assert parse_level("thinking about 7 aspects... score: 3", LEVELS) == 3
    assert parse_level("no idea", LEVELS) is None


def test_unparsable_replies_get_one_repair_turn():
    rows, _ = score_rows([0.0, 0.0])
    judge = Scripted(lambda p, g: "[2]" if g else "the second one looks best", levels=[0, 1], voters=3)
    out = judge.label(rows)
    assert out["labels"][0] == [0, 1]
    assert out["calls"] == [3 + 3]
    repairs = [p for p, greedy in judge.prompts if greedy]
    assert len(repairs) == 3 and all("the second one looks best" in p and "Summarise" in p for p in repairs)
    no_repair = Scripted(lambda p, g: "[2]" if g else "the second one", levels=[0, 1], voters=3, repair=False)
    assert no_repair.label(rows)["labels"][0] == [0, 0]


# -- the single-prompt baseline ------------------------------------------------------------------
def test_single_prompt_baseline(queries):
    oracle = CLUEModule(levels=LEVELS, stage_classifier="oracle", method="single_prompt").label(queries)
    assert flat(oracle["labels"]) == gold_of(queries)
    torch.manual_seed(0)
    logit = CLUEModule(levels=LEVELS, method="single_prompt").label(queries)
    assert set(flat(logit["labels"])) <= set(LEVELS)
    assert logit["calls"] == [len(q["docs"]) for q in queries]
    voted = Scripted(lambda p, g: "3" if "Text: " in p else "", levels=LEVELS, method="single_prompt", voters=3)
    assert set(flat(voted.label(queries[:2])["labels"])) == {3}


# -- metrics ---------------------------------------------------------------------------------------
def test_agreement_metrics_match_reference_implementations():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 5, 60).tolist()
    pred = [min(4, max(0, g + int(rng.integers(-1, 2)))) for g in gold]
    m = agreement(pred, gold, LEVELS)
    assert m["kappa"] == pytest.approx(cohen_kappa_score(gold, pred, labels=LEVELS))
    assert m["weighted_kappa"] == pytest.approx(cohen_kappa_score(gold, pred, labels=LEVELS, weights="quadratic"))
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred, gold)[0])
    assert cohen_kappa(gold, gold, LEVELS, "quadratic") == 1.0
    assert cohen_kappa([2] * 60, gold, LEVELS) == pytest.approx(0.0)
    assert agreement([2] * 60, gold, LEVELS)["pearson"] == 0.0


# -- Lightning, checkpoints, data -------------------------------------------------------------------
def _quiet_trainer(**kwargs):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def test_test_step_logs_agreement_and_checkpoint_round_trip(tmp_path):
    dm = UsefulnessDataModule(synthetic={"num_queries": 6}, batch_size=4)
    oracle = CLUEModule(stage_classifier="oracle")
    _quiet_trainer().test(oracle, datamodule=dm, verbose=False)
    assert oracle.test_metrics["test/kappa"] == 1.0 and oracle.test_metrics["test/llm_calls_per_query"] == 0.0
    torch.manual_seed(1)
    judge = CLUEModule()
    judge.save_pretrained(tmp_path / "clue")
    loaded = CLUEModule.from_pretrained(tmp_path / "clue")
    assert loaded.label(dm.queries)["labels"] == judge.label(dm.queries)["labels"]


def test_generated_logs_are_seeded_and_ordered_by_click(tmp_path):
    a, b = generate_sessions(12, seed=5), generate_sessions(12, seed=5)
    assert a == b and a != generate_sessions(12, seed=6)
    for q in a:
        assert [d["click_order"] for d in q["docs"]] == list(range(1, len(q["docs"]) + 1))
        assert ("only click" in q["docs"][0]["behaviour"]) == (len(q["docs"]) == 1)
    path = tmp_path / "log.jsonl"
    keep = ("doc_id", "title", "snippet", "text", "rank", "click_order", "dwell", "usefulness")
    with open(path, "w") as f:
        for q in a:
            f.write(json.dumps({**{k: q[k] for k in ("qid", "task", "query", "satisfaction")},
                                "docs": [{k: d[k] for k in keep} for d in reversed(q["docs"])]}) + "\n")
    assert read_sessions(path) == a
    path.write_text('{"qid": "q1", "query": "x", "docs": [{"doc_id": "d"}]}\n')
    with pytest.raises(DataFormatError, match=r"log.jsonl:1: docs\[0\] lacks"):
        read_sessions(path)


def test_oracle_labels_predict_satisfaction_better_than_behaviour():
    def pearson_for(features):
        dm = SatisfactionDataModule(synthetic={"num_queries": 200}, seed=0)
        model = SatisfactionPredictor(features=features, optimizer={"name": "Adam", "lr": 0.01})
        trainer = _quiet_trainer(max_epochs=50)
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm, verbose=False)
        return model.test_metrics["test/pearson"]

    assert pearson_for("all") > pearson_for("behaviour") + 0.1
