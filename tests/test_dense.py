"""The shared bi-encoder: positive ordering, the InfoNCE target, train mode, evaluation, subclass hparams."""
import lightning as L
import pytest
import torch

from datamodules.retrieval import RetrievalDataModule
from zoo.dense.module import DenseRetrieverModule, positive_first
from zoo.e2rank.module import E2RankModule

TINY = {"backbone": "tiny-bert", "max_doc_length": 48, "encode_batch_size": 16}


@pytest.fixture(scope="module")
def datamodule():
    dm = RetrievalDataModule(synthetic={"super_topics": 2, "topics_per_super": 2, "docs_per_topic": 10,
                                        "queries_per_topic": 4}, group_size=4, batch_size=4)
    dm.setup("fit")
    return dm


def test_positive_first_moves_each_positive_to_its_group_start():
    rows = positive_first(torch.tensor([2, 0, 3]), 4)
    assert rows.tolist() == [2, 0, 1, 3, 4, 5, 6, 7, 11, 8, 9, 10]


def test_loss_ignores_where_the_positive_sits():
    torch.manual_seed(0)
    module = DenseRetrieverModule(**TINY).eval()
    docs = [f"doc {i} about topic {i % 3}" for i in range(8)]
    first = module.compute_losses({"query": ["topic 0", "topic 1"], "docs": docs, "positive": torch.tensor([0, 0])})
    # the same groups with each positive moved to another slot
    moved = [docs[1], docs[2], docs[0], docs[3], docs[5], docs[6], docs[7], docs[4]]
    second = module.compute_losses({"query": ["topic 0", "topic 1"], "docs": moved, "positive": torch.tensor([2, 3])})
    torch.testing.assert_close(first["loss"], second["loss"])
    # and it is InfoNCE: cross-entropy of the positive among every document of the batch
    q, d = module.embed_queries(["topic 0", "topic 1"]), module.embed_docs(docs)
    logits = q @ d.T / module.hparams.temperature
    torch.testing.assert_close(first["loss"], torch.nn.functional.cross_entropy(logits, torch.tensor([0, 4])))


@pytest.mark.parametrize("dropout", [True, False])
def test_fit_runs_the_encoder_in_the_configured_mode(datamodule, dropout, tmp_path):
    module = DenseRetrieverModule(**TINY, dropout=dropout)
    modes = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(pl_module.encoder.backbone.training)

    L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Probe()], default_root_dir=tmp_path).fit(module, datamodule)
    assert modes == [dropout, dropout]


def test_test_scores_dense_retrieval_and_first_stage_rerank(datamodule, tmp_path):
    module = DenseRetrieverModule(**TINY)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(module, datamodule)
    metrics = module.test_metrics
    for system in ("retrieval", "rerank_query", "first_stage"):
        assert 0.0 <= metrics[f"{system}/ndcg@10"] <= 1.0
    assert (tmp_path / "runs").is_dir()


def test_a_subclass_saves_its_own_and_the_base_hyperparameters():
    module = E2RankModule(backbone="tiny-bert", max_doc_length=48, temperature=0.07, lambda_ranknet=1.5)
    assert module.hparams.temperature == 0.07 and module.hparams.lambda_ranknet == 1.5
    assert module.infonce.temperature == 0.07 and "dropout" in module.hparams


class Extended(DenseRetrieverModule):
    """The pattern for papers: new arguments by name, the base's through **kwargs."""

    def __init__(self, margin: float = 0.1, **base) -> None:
        super().__init__(**base)


def test_subclass_with_kwargs_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    module = Extended(margin=0.3, **TINY, temperature=0.07).eval()
    assert module.hparams.margin == 0.3 and module.hparams.temperature == 0.07
    loaded = Extended.from_pretrained(module.save_pretrained(tmp_path / "m"))
    assert loaded.hparams.margin == 0.3 and loaded.hparams.temperature == 0.07
    torch.testing.assert_close(loaded.embed_queries(["a query"]), module.embed_queries(["a query"]))
