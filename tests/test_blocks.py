"""Shared retrieval blocks: pooling, normalisation, InfoNCE, RankNet, the listwise prompt."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.backbones import build_backbone, build_tiny_tokenizer
from zoo.blocks.encoder import EmbeddingEncoder, last_token_index, pool
from zoo.blocks.index import DenseIndex
from zoo.blocks.losses import InfoNCELoss, RankNetLoss
from zoo.blocks.prompts import ListwisePrompt

TEXTS = ["a short query", "a much longer document about the effect of data on the model study results",
         "medium length text here"]


def _encoder(name: str, pooling: str, side: str, append_eos: bool = False) -> EmbeddingEncoder:
    torch.manual_seed(0)
    model, tok = build_backbone(name, padding_side=side)
    return EmbeddingEncoder(model.eval(), tok, pooling=pooling, append_eos=append_eos)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_last_token_pooling_same_under_left_and_right_padding(name):
    left = _encoder(name, "last_token", "left", append_eos=True)
    right = _encoder(name, "last_token", "right", append_eos=True)
    right.backbone.load_state_dict(left.backbone.state_dict())
    batch_left, batch_right = left.tokenize(TEXTS), right.tokenize(TEXTS)
    assert (batch_left["attention_mask"][:, -1] == 1).all()          # left padding: last column is real
    assert not (batch_right["attention_mask"][:, -1] == 1).all()
    with torch.no_grad():
        emb_left, emb_right = left(**batch_left), right(**batch_right)
        hidden = left.backbone(**batch_left).last_hidden_state
    torch.testing.assert_close(emb_left, emb_right, atol=1e-5, rtol=1e-5)
    # Left padding: the pooled position is T-1; right padding: mask.sum - 1.
    T = batch_left["input_ids"].shape[1]
    assert (last_token_index(batch_left["attention_mask"]) == T - 1).all()
    assert torch.equal(last_token_index(batch_right["attention_mask"]), batch_right["attention_mask"].sum(1) - 1)
    assert torch.equal(batch_left["input_ids"][:, -1], torch.full((3,), left.tokenizer.eos_token_id))
    del hidden


def test_absolute_positions_survive_left_padding():
    left, right = _encoder("tiny-bert", "mean", "left"), _encoder("tiny-bert", "mean", "right")
    right.backbone.load_state_dict(left.backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(left(**left.tokenize(TEXTS)), right(**right.tokenize(TEXTS)),
                                   atol=1e-5, rtol=1e-5)


def test_pooling_rules_on_known_tensor():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[1.0, 2.0], [9.0, 10.0]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool(hidden, mask, "last_token"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, mask, "max")


@pytest.mark.parametrize("pooling", ["mean", "cls", "last_token"])
def test_embeddings_unit_norm_and_cosines_bounded(pooling):
    enc = _encoder("tiny-bert", pooling, "right")
    emb = enc.encode(TEXTS, batch_size=2)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    sims = emb @ emb.T
    assert sims.min() >= -1 - 1e-5 and sims.max() <= 1 + 1e-5


def test_encode_keeps_input_order_and_matches_embed():
    enc = _encoder("tiny-bert", "mean", "right")
    texts = TEXTS * 3
    with torch.no_grad():
        direct = enc.embed(texts)
    torch.testing.assert_close(enc.encode(texts, batch_size=2), direct, atol=1e-5, rtol=1e-5)


def test_append_eos_survives_truncation():
    enc = _encoder("tiny-llama", "last_token", "left", append_eos=True)
    batch = enc.tokenize(["word " * 100], max_length=16)
    assert batch["input_ids"].shape[1] == 16
    assert batch["input_ids"][0, -1].item() == enc.tokenizer.eos_token_id


def test_tiny_tokenizer_covers_ascii_without_unknowns():
    tok = build_tiny_tokenizer()
    ids = tok("Hello, World! 42 + x_y = {z}; ~`|", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids


# -- InfoNCE ---------------------------------------------------------------------------------
def _naive_infonce(q, d, group, tau):
    total = 0.0
    for i in range(q.shape[0]):
        logits = [(q[i] @ d[j]).item() / tau for j in range(d.shape[0])]
        pos = logits[i * group]
        total += -(pos - math.log(sum(math.exp(x) for x in logits)))
    return total / q.shape[0]


@pytest.mark.parametrize("hard_negatives", [0, 1, 2])
def test_infonce_equals_naive_formula(hard_negatives):
    torch.manual_seed(1)
    group = 1 + hard_negatives
    q = F.normalize(torch.randn(4, 8), dim=1)
    d = F.normalize(torch.randn(4 * group, 8), dim=1)
    loss = InfoNCELoss(temperature=0.05)(q, d)
    assert loss.item() == pytest.approx(_naive_infonce(q, d, group, 0.05), rel=1e-5)


def test_infonce_rejects_ragged_groups():
    with pytest.raises(ValueError, match="whole group"):
        InfoNCELoss()(torch.randn(3, 4), torch.randn(7, 4))


# -- RankNet ---------------------------------------------------------------------------------
def _random_case(seed=0, B=3, K=6):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, K, generator=gen) * 2 - 1
    order = torch.stack([torch.randperm(K, generator=gen) for _ in range(B)])
    return scores, order


def test_ranknet_equals_naive_double_loop():
    scores, order = _random_case()
    losses = []
    for b in range(scores.shape[0]):
        rank = {int(doc): r for r, doc in enumerate(order[b])}
        for j, k in itertools.permutations(range(scores.shape[1]), 2):
            if rank[j] < rank[k]:
                losses.append(math.log1p(math.exp((scores[b, k] - scores[b, j]).item() * 10)))
    assert RankNetLoss(10.0)(scores, order).item() == pytest.approx(sum(losses) / len(losses), abs=1e-6)
    per_query = sum(losses) / scores.shape[0]
    assert RankNetLoss(10.0, "query_sum")(scores, order).item() == pytest.approx(per_query, abs=1e-5)


def test_ranknet_pair_count_is_k_choose_2():
    _, order = _random_case(K=16)
    mask = RankNetLoss().pair_mask(order, 16)
    assert (mask.sum(dim=(1, 2)) == 16 * 15 // 2).all()


def test_ranknet_padding_excludes_unranked_documents():
    order = torch.tensor([[2, 0, -1, -1]])
    mask = RankNetLoss().pair_mask(order, 4)
    assert mask.sum() == 1 and mask[0, 2, 0]


def test_ranknet_invariances():
    scores, order = _random_case(seed=3)
    loss = RankNetLoss()
    assert loss(scores + 0.37, order).item() == pytest.approx(loss(scores, order).item(), abs=1e-6)
    assert loss(torch.zeros_like(scores), order).item() == pytest.approx(math.log(2), abs=1e-7)
    K = scores.shape[1]
    sorted_scores = torch.zeros_like(scores)
    for b in range(scores.shape[0]):
        sorted_scores[b, order[b]] = torch.linspace(1.0, -1.0, K)
    reversed_scores = -sorted_scores
    assert loss(sorted_scores * 10, order).item() < 1e-6
    assert loss(reversed_scores, order) > loss(sorted_scores, order)


def test_ranknet_gradient_direction():
    scores, order = _random_case(seed=4)
    scores.requires_grad_(True)
    RankNetLoss()(scores, order).backward()
    rows = torch.arange(scores.shape[0])
    assert (scores.grad[rows, order[:, 0]] < 0).all()
    assert (scores.grad[rows, order[:, -1]] > 0).all()


def test_ranknet_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="pair_mean"):
        RankNetLoss(reduction="sum")


# -- listwise prompt -------------------------------------------------------------------------
def test_listwise_prompt_layout_and_truncation():
    tok = build_tiny_tokenizer()
    prompt = ListwisePrompt(instruction="Rank these", num_docs=20, max_doc_tokens=5)
    docs = [f"doc{i} " + "word " * 30 for i in range(25)]
    text = prompt.build("the query", docs, tok)
    lines = text.split("\n")
    assert lines[0] == "Rank these:" and lines[1] == "Documents:"
    assert lines[-1] == "Search Query: the query"
    numbered = lines[2:-1]
    assert [line.split(" ")[0] for line in numbered] == [f"[{i}]" for i in range(1, 21)]
    assert "doc20" not in text and "doc19" in text          # the 21st candidate never enters
    for line in numbered:
        body = line.split(" ", 1)[1]
        assert len(tok(body, add_special_tokens=False)["input_ids"]) <= 5
    assert ListwisePrompt(num_docs=20).build("q", docs[:3]).count("\n[") == 3


def test_listwise_prompt_chat_template_requires_one():
    with pytest.raises(ValueError, match="chat template"):
        ListwisePrompt(chat_template=True).build("q", ["d"], build_tiny_tokenizer())


# -- faiss ---------------------------------------------------------------------------------
def test_dense_index_exact_inner_product_search():
    torch.manual_seed(0)
    docs = F.normalize(torch.randn(50, 16), dim=1)
    queries = F.normalize(torch.randn(5, 16), dim=1)
    index = DenseIndex(16, device="cpu")
    index.add([f"d{i}" for i in range(50)], docs)
    run = index.search_run([f"q{i}" for i in range(5)], queries, k=7)
    expected = (queries @ docs.T).topk(7, dim=1)
    for i in range(5):
        assert list(run[f"q{i}"]) == [f"d{j}" for j in expected.indices[i].tolist()]
        assert list(run[f"q{i}"].values()) == pytest.approx(expected.values[i].tolist(), abs=1e-5)
    assert len(index.search(queries, k=500)[1][0]) == 50


def test_listwise_prompt_keeps_the_query_within_the_token_limit():
    tok = build_tiny_tokenizer()
    prompt = ListwisePrompt(num_docs=20, max_doc_tokens=48)
    docs = ["word " * 100] * 20
    text = prompt.build("the final query", docs, tok, max_tokens=200)
    assert len(tok(text)["input_ids"]) <= 200
    assert text.endswith("Search Query: the final query") and text.count("\n[") == 20
    roomy = prompt.build("q", docs[:2], tok, max_tokens=10_000)
    assert all(len(tok(line.split(" ", 1)[1], add_special_tokens=False)["input_ids"]) == 48
               for line in roomy.split("\n")[2:-1])
