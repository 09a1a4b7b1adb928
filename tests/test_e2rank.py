"""E2Rank: the spec's properties, training smoke test, checkpoints and export."""
import pickle

import lightning as L
import pytest
import torch

import zoo
from datamodules.retrieval import RetrievalDataModule, collate_train
from zoo.blocks.index import DenseIndex
from zoo.e2rank.module import E2RankModule
from zoo.hub import CheckpointError, safe_torch_load

TINY = dict(backbone="tiny-bert", max_doc_length=64, max_prompt_length=256,
            listwise={"num_docs": 20, "max_doc_tokens": 8})


def tiny_module(**overrides) -> E2RankModule:
    torch.manual_seed(0)
    return E2RankModule(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def datamodule():
    dm = RetrievalDataModule(synthetic={"super_topics": 2, "topics_per_super": 2, "docs_per_topic": 10,
                                     "queries_per_topic": 4}, group_size=4, batch_size=4)
    dm.setup("fit")
    return dm


def test_instances_have_teacher_order_and_positive(datamodule):
    row = datamodule.train_rows[0]
    assert len(row["docs"]) == 4 and sorted(row["order"]) == [0, 1, 2, 3]
    # The teacher ranks the judged positive first; the shuffled prompt order hides its slot.
    assert row["order"][0] == row["positive"]
    assert any(r["positive"] != 0 for r in datamodule.train_rows)


def test_positive_from_teacher_picks_teacher_top_as_infonce_target(monkeypatch):
    module = tiny_module(use_ranknet=False).eval()
    seen = {}

    def record(module_, q, d, *_):
        seen["docs"] = d
        return q.sum() * 0

    monkeypatch.setattr(module, "contrastive_loss", record.__get__(module))
    docs = [f"doc {i}" for i in range(8)]
    batch = {"query": ["q0", "q1"], "docs": docs, "order": torch.tensor([[2, 0, 1, 3], [3, 2, 1, 0]]),
             "positive": torch.tensor([0, 0])}
    module.compute_losses(batch)
    embedded = module.embed_docs(docs)
    torch.testing.assert_close(seen["docs"][0], embedded[2], atol=1e-5, rtol=1e-5)   # teacher top of q0
    torch.testing.assert_close(seen["docs"][4], embedded[4 + 3], atol=1e-5, rtol=1e-5)
    module_gold = tiny_module(use_ranknet=False, positive_from_teacher=False).eval()
    seen.clear()
    monkeypatch.setattr(module_gold, "contrastive_loss", record.__get__(module_gold))
    module_gold.compute_losses(batch)
    torch.testing.assert_close(seen["docs"][0], module_gold.embed_docs(docs)[0], atol=1e-5, rtol=1e-5)


def test_without_listwise_prompt_the_pseudo_query_path_is_never_called(datamodule, monkeypatch):
    module = tiny_module(use_listwise_prompt=False)
    monkeypatch.setattr(module, "embed_prompts", lambda prompts: pytest.fail("prompt path called"))
    losses = module.compute_losses(collate_train(datamodule.train_rows[:2]))
    assert set(losses) == {"infonce", "ranknet", "loss"}


def _eval_state(module, n_docs=120):
    doc_ids = [f"d{i}" for i in range(n_docs)]
    texts = [f"document number {i} about topic {i % 7}" for i in range(n_docs)]
    emb = module.encoder.encode(texts)
    index = DenseIndex(emb.shape[1], device="cpu")
    index.add(doc_ids, emb)
    module._eval_state = {"doc_ids": doc_ids, "texts": texts, "emb": emb, "index": index,
                          "row": {d: i for i, d in enumerate(doc_ids)}}
    return doc_ids


def test_rerank_scores_every_candidate_and_encodes_only_the_prompts():
    module = tiny_module().eval()
    doc_ids = _eval_state(module)
    calls = []
    original = module.encoder.embed
    module.encoder.embed = lambda texts, max_length=None: calls.append(list(texts)) or original(texts, max_length)
    candidates = [doc_ids[:100], doc_ids[10:110]]
    runs = module.rerank(["query one", "query two"], candidates)
    assert len(calls) == 1 and len(calls[0]) == 2            # one prompt per query, no documents
    assert all(text.startswith(module.prompt.instruction) for text in calls[0])
    for run, cands in zip(runs, candidates):
        assert sorted(run) == sorted(cands)                   # all 100 scored, not only the 20 shown
    assert "[20]" in calls[0][0] and "[21]" not in calls[0][0]


def test_training_reduces_both_losses(datamodule):
    module = tiny_module(optimizer={"name": "AdamW", "lr": 1e-3}, temperature=0.05, max_doc_length=32,
                         max_prompt_length=96, listwise={"max_doc_tokens": 16})
    batches = [collate_train(datamodule.train_rows[i:i + 4]) for i in range(0, 8, 4)]
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    history = []
    for step in range(50):
        losses = module.compute_losses(batches[step % 2])
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    for name in ("infonce", "ranknet"):
        start = sum(h[name] for h in history[:2]) / 2
        end = sum(h[name] for h in history[-2:]) / 2
        assert end < 0.7 * start, (name, start, end)


def test_hparams_are_plain_values():
    with pytest.raises(TypeError, match="listwise"):
        E2RankModule(**{**TINY, "listwise": {"num_docs": object()}})


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path):
    module = tiny_module().eval()
    folder = module.save_pretrained(tmp_path / "model", metrics={"test/rerank/ndcg@10": 0.5}, data="synthetic")
    assert {p.name for p in folder.iterdir()} >= {"config.yaml", "model.safetensors", "README.md", "backbone"}
    card = (folder / "README.md").read_text()
    assert "2510.22733" in card and "ndcg@10" in card and zoo.__version__ in card
    loaded = zoo.load(str(folder))
    assert type(loaded) is E2RankModule and dict(loaded.hparams) == dict(module.hparams)
    texts = ["a query", "some document text"]
    torch.testing.assert_close(loaded.encoder.encode(texts), module.encoder.encode(texts), atol=0, rtol=0)


def test_publish_then_load_by_name(tmp_path, monkeypatch):
    from zoo.hub import publish
    monkeypatch.setenv("ZOO_STORE", str(tmp_path / "store"))
    module = tiny_module().eval()
    publish(module.save_pretrained(tmp_path / "model"), "e2rank", "tiny")
    loaded = zoo.load("e2rank:tiny")
    torch.testing.assert_close(loaded.encoder.encode(["x y"]), module.encoder.encode(["x y"]), atol=0, rtol=0)


@pytest.mark.parametrize("backbone", ["tiny-bert", "minilm"])
def test_export_loads_in_transformers_and_sentence_transformers(tmp_path, backbone):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from zoo.blocks.encoder import pool
    module = tiny_module(backbone=backbone).eval()
    folder = module.encoder.export(tmp_path / "export")
    texts = ["what is the effect of data", "a longer document " * 10, "x"]
    ours = module.encoder.encode(texts)
    tok, hf = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=module.encoder.max_length, return_tensors="pt")
    with torch.no_grad():
        hf_emb = torch.nn.functional.normalize(pool(hf(**batch).last_hidden_state, batch["attention_mask"], "mean"))
    torch.testing.assert_close(hf_emb, ours, atol=1e-5, rtol=1e-4)
    st = SentenceTransformer(str(folder), device="cpu")
    torch.testing.assert_close(torch.from_numpy(st.encode(texts)), ours, atol=1e-5, rtol=1e-4)


def test_lightning_checkpoint_loads_weights_only_and_hostile_one_is_refused(tmp_path, datamodule):
    module = tiny_module()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["backbone"] == "tiny-bert"
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint["hyper_parameters"]["evil"] = Hostile()
    hostile = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, hostile, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match="not be unpickled"):
        safe_torch_load(hostile)
    resumed = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        resumed.fit(tiny_module(), datamodule=datamodule, ckpt_path=hostile, weights_only=True)
    assert not marker.exists()
