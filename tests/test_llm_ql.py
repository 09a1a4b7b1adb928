"""LLM-QL: the Attention Stop mask, sequence layout and labels, corruption, QL ranking and Stage coupling."""
import math
import random

import lightning as L
import pytest
import torch

from datamodules.llm_ql import CorruptedPairs, QLPairsDataModule
from zoo.dense.module import DenseRetrieverModule
from zoo.llm_ql.corruption import corrupt_words
from zoo.llm_ql.masks import build_attention_stop_mask, position_ids_from_mask
from zoo.llm_ql.module import QLPretrainModule
from zoo.llm_ql.ranker import DirichletQL, QLRanker
from zoo.llm_ql.sequences import IGNORE

TINY = {"backbone": "tiny-llama", "doc_template": "passage: {doc} summary:", "doc_len": 40, "max_query_length": 12}
DOCS = ["zeta alpha beta gamma", "a much longer passage with many more words in it about delta and epsilon"]
QUERIES = ["alpha gamma", "delta"]
MIN = torch.finfo(torch.float32).min


def expected_allowed(mask_row: list[int], k: int, stop: bool) -> torch.Tensor:
    """The spec's layout, written element by element."""
    n = len(mask_row)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if not mask_row[j] or j > i:
                continue
            out[i, j] = i <= k or not stop or j >= k
    return out


@pytest.mark.parametrize("stop", [True, False])
def test_mask_matches_the_spec_layout_and_padding_rows_stay_finite(stop):
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 0, 0]])
    e_pos = torch.tensor([4, 2])
    mask = build_attention_stop_mask(attention_mask, e_pos, attention_stop=stop)
    assert mask.shape == (2, 1, 9, 9)
    for b in range(2):
        real = attention_mask[b].bool()
        allowed = expected_allowed(attention_mask[b].tolist(), int(e_pos[b]), stop)
        got = mask[b, 0] == 0
        assert torch.equal(got[real], allowed[real])              # every non-padding row exactly
        assert set(mask[b, 0].unique().tolist()) <= {0.0, MIN}
        assert (got.any(dim=1)).all()                              # no all-masked row (padding included)
        assert not got[~real][:, real].any()                       # padding rows see no real token
    assert torch.softmax(mask[:, 0], dim=-1).isfinite().all()


def test_attention_weights_from_query_to_document_are_zero_in_every_layer():
    torch.manual_seed(0)
    module = QLPretrainModule(**TINY, attn_implementation="eager")
    seq = module.builder.build(DOCS, QUERIES)
    attention = build_attention_stop_mask(seq["attention_mask"], seq["e_pos"])
    out = module.lm(input_ids=seq["input_ids"], attention_mask=attention,
                    position_ids=position_ids_from_mask(seq["attention_mask"]), output_attentions=True)
    e = int(seq["e_pos"][0])                                        # fixed layout: the same [E] in every row
    assert (seq["e_pos"] == TINY["doc_len"]).all()
    for probs in out.attentions:
        assert probs.isfinite().all()
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        assert probs[:, :, e + 1:, :e].abs().max() == 0
        for b in range(len(DOCS)):
            query_rows = seq["attention_mask"][b, e + 1:].bool()
            assert probs[b, :, e + 1:, e][:, query_rows].min() > 0   # every query token sees [E]


def test_one_layer_model_query_logits_ignore_the_document_only_under_attention_stop():
    # With one layer, [E]'s keys and values come from its embedding alone: under Attention Stop
    # nothing of the document reaches the query positions; with two layers it flows through [E].
    def query_logits(layers: int, stop: bool, docs: list[str]) -> torch.Tensor:
        torch.manual_seed(0)
        module = QLPretrainModule(**TINY, backbone_overrides={"num_hidden_layers": layers}, attention_stop=stop)
        seq = module.builder.build(docs, QUERIES)
        mask = build_attention_stop_mask(seq["attention_mask"], seq["e_pos"], attention_stop=stop)
        logits = module.lm(input_ids=seq["input_ids"], attention_mask=mask,
                           position_ids=position_ids_from_mask(seq["attention_mask"])).logits
        return logits[:, TINY["doc_len"] + 1:]                 # the query positions, after [E]

    other = ["zeta omega beta gamma", DOCS[1].replace("delta", "theta")]
    torch.testing.assert_close(query_logits(1, True, DOCS), query_logits(1, True, other), atol=1e-5, rtol=0)
    assert (query_logits(1, False, DOCS) - query_logits(1, False, other)).abs().max() > 1e-3
    assert (query_logits(2, True, DOCS) - query_logits(2, True, other)).abs().max() > 1e-3


def test_position_ids_count_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    assert position_ids_from_mask(mask, pads_take_positions=True).tolist() == [list(range(5))] * 2


@pytest.mark.parametrize("lm_on_document", [False, True])
def test_labels_cover_query_and_end_token_or_every_real_token(lm_on_document):
    module = QLPretrainModule(**TINY, lm_on_document=lm_on_document)
    seq = module.builder.build(DOCS, QUERIES)
    eos = module.tokenizer.eos_token_id
    for b, query in enumerate(QUERIES):
        real = seq["attention_mask"][b].bool()
        targets = seq["labels"][b] != IGNORE
        assert not targets[~real].any()                             # padding is never a target
        e = int(seq["e_pos"][b])
        q_ids = module.tokenizer(query, add_special_tokens=False)["input_ids"]
        positions = real.nonzero()[:, 0]
        if lm_on_document:
            assert torch.equal(targets.nonzero()[:, 0], positions[1:])
        else:
            assert targets.nonzero()[:, 0].tolist() == list(range(e + 1, e + 2 + len(q_ids)))
        assert seq["input_ids"][b, e] == eos
        assert seq["input_ids"][b, e + 1:e + 1 + len(q_ids)].tolist() == q_ids
        assert seq["input_ids"][b, e + 1 + len(q_ids)] == eos
        assert torch.equal(seq["labels"][b][targets], seq["input_ids"][b][targets])


def test_long_passages_are_cut_inside_the_passage_and_e_stays_at_doc_len():
    module = QLPretrainModule(**TINY)
    seq = module.builder.build(["word " * 200], ["q"])
    assert int(seq["e_pos"][0]) == TINY["doc_len"]
    text = module.tokenizer.decode(seq["input_ids"][0, :TINY["doc_len"]])
    assert text.startswith("passage :") and text.endswith("summary :")
    per_row = QLPretrainModule(**TINY, fixed_doc_len=False).builder.build(DOCS, QUERIES)
    assert per_row["attention_mask"][:, 0].all()                     # right padding only
    assert per_row["e_pos"][0] < per_row["e_pos"][1]


def test_corruption_rate_identity_and_seed():
    text = " ".join(f"w{i}" for i in range(10_000))
    out = corrupt_words(text, 0.6, random.Random(0)).split()
    rate = sum(w == "_" for w in out) / len(out)
    assert abs(rate - 0.6) < 3 * math.sqrt(0.6 * 0.4 / len(out))
    assert corrupt_words("a  b\tc", 0.0, random.Random(0)) == "a  b\tc"
    assert set(corrupt_words(text, 1.0, random.Random(0)).split()) == {"_"}
    assert corrupt_words(text, 0.3, random.Random(5)) == corrupt_words(text, 0.3, random.Random(5))
    # the dataset corrupts the passage only; the instruction is added later by the module
    pairs = CorruptedPairs([("my query", ["some passage words"])], 1.0, "_", seed=0)
    assert pairs[0] == {"query": "my query", "doc": "_ _ _"}
    assert CorruptedPairs([("q", [text])], 0.5, "_", 3)[0] == CorruptedPairs([("q", [text])], 0.5, "_", 3)[0]


def test_ql_ranker_score_is_the_sum_of_query_token_log_probs_of_a_plain_forward():
    torch.manual_seed(0)
    module = QLPretrainModule(**TINY, fixed_doc_len=False)
    ranker = QLRanker(module.lm, module.builder, batch_size=2)
    scores = ranker.score("alpha gamma", DOCS)
    alone = QLRanker(module.lm, module.builder, batch_size=1).score("alpha gamma", DOCS)
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(alone), atol=1e-4, rtol=0)  # batch-independent
    q_ids = module.tokenizer("alpha gamma", add_special_tokens=False)["input_ids"]
    for doc, score in zip(DOCS, scores):
        prompt = module.builder.doc_prompt_ids(doc)
        ids = torch.tensor([prompt + [module.tokenizer.eos_token_id] + q_ids])
        e = len(prompt)
        mask = torch.zeros(ids.shape[1], ids.shape[1])
        mask[torch.triu(torch.ones_like(mask, dtype=torch.bool), 1)] = MIN
        mask[e + 1:, :e] = MIN
        with torch.no_grad():
            logp = module.lm(input_ids=ids, attention_mask=mask[None, None]).logits.log_softmax(-1)
        manual = sum(logp[0, t - 1, ids[0, t]].item() for t in range(e + 1, ids.shape[1]))
        assert score <= 0
        assert score == pytest.approx(manual, abs=1e-4)


def test_dirichlet_ql_matches_a_hand_computation():
    docs = {"d1": "apple banana apple", "d2": "banana cherry"}
    ql = DirichletQL(docs, mu=2.0)
    # collection: apple 2, banana 2, cherry 1 (5 words); "kiwi" is unseen and skipped
    p_apple, p_banana = 2 / 5, 2 / 5
    d1 = math.log((2 + 2 * p_apple) / (3 + 2)) + math.log((1 + 2 * p_banana) / (3 + 2))
    d2 = math.log((0 + 2 * p_apple) / (2 + 2)) + math.log((1 + 2 * p_banana) / (2 + 2))
    assert ql.score("Apple banana kiwi", ["d1", "d2"]) == pytest.approx([d1, d2])


@pytest.fixture(scope="module")
def pairs_data():
    dm = QLPairsDataModule(synthetic={"super_topics": 2, "topics_per_super": 2, "docs_per_topic": 10,
                                      "queries_per_topic": 4}, batch_size=8, eval_batch_size=8, mask_prob=0.3)
    dm.setup("fit")
    return dm


def test_training_lowers_held_apart_query_ce_and_test_ranks_candidates(pairs_data, tmp_path):
    L.seed_everything(0)
    module = QLPretrainModule(doc_len=96, max_query_length=16, optimizer={"name": "AdamW", "lr": 3e-3})
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.test(module, pairs_data)
    before = module.test_metrics
    trainer.fit(module, pairs_data)
    trainer.test(module, pairs_data)
    after = module.test_metrics
    assert after["query_ce"] < before["query_ce"] - 1.0
    for system in ("ql", "dirichlet_ql", "first_stage"):
        assert 0.0 <= after[f"{system}/ndcg@10"] <= 1.0


def test_stage2_starts_from_the_exported_stage1_decoder(tmp_path):
    torch.manual_seed(0)
    stage1 = QLPretrainModule(**TINY)
    with torch.no_grad():
        for p in stage1.lm.parameters():
            p.add_(0.01)
    stage1.save_pretrained(tmp_path / "stage1")
    stage2 = DenseRetrieverModule(backbone=str(tmp_path / "stage1" / "hf"), pooling="last_token", append_eos=True,
                                  padding_side="left", max_doc_length=48)
    mine = dict(stage2.encoder.backbone.named_parameters())
    for name, value in stage1.lm.model.named_parameters():
        torch.testing.assert_close(mine[name], value, atol=0, rtol=0)
    # and the embedding is the final hidden state at the appended end token
    emb = stage2.embed_docs(["alpha beta"])
    ids = stage1.tokenizer("alpha beta", add_special_tokens=False)["input_ids"] + [stage1.tokenizer.eos_token_id]
    hidden = stage1.lm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    torch.testing.assert_close(emb[0], torch.nn.functional.normalize(hidden, dim=-1), atol=1e-5, rtol=0)
    reloaded = QLPretrainModule.from_pretrained(tmp_path / "stage1")
    torch.testing.assert_close(reloaded.lm.lm_head.weight, stage1.lm.lm_head.weight)
