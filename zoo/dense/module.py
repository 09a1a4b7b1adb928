"""The zoo's shared bi-encoder: contrastive training and dense-retrieval evaluation.

Every embedding paper builds on this module (E2Rank, BOOM, utility-focused annotation, LLM-QL):
a tied query/document ``EmbeddingEncoder`` trained with InfoNCE over in-batch and hard
negatives, and evaluated by encoding the corpus once, searching a faiss index and scoring the
run with the shared IR metrics. With a first-stage run (BM25 top-k) the query embedding also
reranks those candidates (``rerank_query``).

Training batches: ``query`` (B strings), ``docs`` (B·G strings, each query's G documents
contiguous) and ``positive`` (B, the index of each group's positive); optional ``labels``
(B, G multi-hot) for multi-positive losses. Evaluation batches: ``qid`` and ``query``; the
datamodule answers ``retrieval_data(stage)`` and ``first_stage_run(stage)``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zoo.backbones import build_backbone
from zoo.base import ZooModule
from zoo.blocks.distributed import merge_across_ranks
from zoo.blocks.encoder import EmbeddingEncoder
from zoo.blocks.losses import InfoNCELoss
from zoo.blocks.metrics import evaluate_run
from zoo.blocks.retrieval import build_index, encode_corpus

DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@100", "map")


def positive_first(positive: Tensor, group: int) -> Tensor:
    """Row indices into the flat (B·G) documents that put each group's positive first."""
    n_queries = positive.shape[0]
    slots = torch.arange(group, device=positive.device).expand(n_queries, group)
    rest = slots[slots != positive[:, None]].view(n_queries, group - 1)
    ordered = torch.cat([positive[:, None], rest], dim=1)
    return (ordered + torch.arange(n_queries, device=positive.device)[:, None] * group).flatten()


class DenseRetrieverModule(ZooModule):
    """Hooks to override: ``format_query``, ``format_doc``, ``contrastive_loss``, ``compute_losses``,
    ``extend_eval_runs`` (more systems scored during evaluation)."""

    zoo_name = "dense"
    card_notes = (
        "A tied bi-encoder trained with InfoNCE (the positive against the other documents of its "
        "group and of the batch). Evaluation retrieves from the whole corpus (`retrieval`) and, with a "
        "first-stage run, reranks its candidates with the query embedding (`rerank_query`)."
    )

    def __init__(
        self,
        backbone: str = "minilm",
        backbone_overrides: dict | None = None,
        pooling: str = "mean",
        normalize: bool = True,
        append_eos: bool = False,
        padding_side: str | None = None,
        query_template: str = "{query}",
        doc_template: str = "{doc}",
        max_query_length: int = 64,
        max_doc_length: int = 256,
        temperature: float = 0.05,
        gather_across_devices: bool = False,
        dropout: bool = True,
        rerank_depth: int = 100,
        encode_batch_size: int = 64,
        metrics: Sequence[str] | None = None,
        gradient_checkpointing: bool = False,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        model, tokenizer = build_backbone(backbone, padding_side=padding_side, config_overrides=backbone_overrides)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.encoder = EmbeddingEncoder(model, tokenizer, pooling=pooling, normalize=normalize,
                                        max_length=max_doc_length, append_eos=append_eos)
        self.infonce = InfoNCELoss(temperature, gather_across_devices=gather_across_devices)
        self._eval_state: dict[str, Any] = {}

    def backbone_parts(self) -> tuple[Any, Any]:
        return self.encoder.backbone, self.encoder.tokenizer

    def on_fit_start(self) -> None:
        # Backbones are built in eval mode; fine-tuning normally keeps the backbone's dropout on.
        self.encoder.train(self.hparams.dropout)

    # -- hooks ---------------------------------------------------------------------------
    def format_query(self, query: str) -> str:
        return self.hparams.query_template.format(query=query)

    def format_doc(self, doc: str) -> str:
        return self.hparams.doc_template.format(doc=doc)

    def contrastive_loss(self, queries: Tensor, docs: Tensor, batch: dict[str, Any]) -> Tensor:
        """``docs`` holds each query's group with its positive first."""
        return self.infonce(queries, docs)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        q = self.embed_queries(batch["query"])
        d = self.embed_docs(batch["docs"])
        rows = positive_first(batch["positive"], d.shape[0] // q.shape[0])
        loss = self.contrastive_loss(q, d[rows], batch)
        return {"infonce": loss, "loss": loss}

    # -- embedding -----------------------------------------------------------------------
    def embed_queries(self, queries: Sequence[str]) -> Tensor:
        return self.encoder.embed([self.format_query(q) for q in queries], self.hparams.max_query_length)

    def embed_docs(self, docs: Sequence[str]) -> Tensor:
        return self.encoder.embed([self.format_doc(d) for d in docs], self.hparams.max_doc_length)

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch)
        n = len(batch["query"])
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=n, sync_dist=True)
        return losses["loss"]

    # -- evaluation ----------------------------------------------------------------------
    def start_eval(self, stage: str) -> None:
        data = self.trainer.datamodule.retrieval_data(stage)
        doc_ids = list(data.corpus)
        texts = [data.doc_text(d) for d in doc_ids]
        formatted = [self.format_doc(t) for t in texts]
        # Weights do not change during test, so test embeddings are worth caching on disk.
        emb = encode_corpus(self.encoder, doc_ids, formatted, batch_size=self.hparams.encode_batch_size,
                            max_length=self.hparams.max_doc_length, cache=stage == "test",
                            progress=self.trainer.is_global_zero)
        self._eval_state = {"data": data, "doc_ids": doc_ids, "texts": texts, "emb": emb,
                            "row": {d: i for i, d in enumerate(doc_ids)},
                            "index": build_index(doc_ids, emb),
                            "first_stage": self.trainer.datamodule.first_stage_run(stage),
                            "runs": {"retrieval": {}, "rerank_query": {}}}

    def on_validation_epoch_start(self) -> None:
        self.start_eval("validate")

    def on_test_epoch_start(self) -> None:
        self.start_eval("test")

    def eval_step(self, batch: dict[str, Any]) -> None:
        state = self._eval_state
        depth = self.hparams.rerank_depth
        with torch.no_grad():
            q = self.embed_queries(batch["query"]).float().cpu()
        runs = state["runs"]
        runs["retrieval"].update(state["index"].search_run(batch["qid"], q, depth))
        candidates = []
        for qid, q_emb in zip(batch["qid"], q):
            first = state["first_stage"].get(qid) if state["first_stage"] is not None else None
            if first is None:
                first = runs["retrieval"][qid]
            else:
                cand = state["emb"][[state["row"][d] for d in first]]
                runs["rerank_query"][qid] = dict(zip(first, (cand @ q_emb).tolist()))
            candidates.append(sorted(first, key=first.get, reverse=True)[:depth])
        self.extend_eval_runs(batch, candidates)

    def extend_eval_runs(self, batch: dict[str, Any], candidates: list[list[str]]) -> None:
        """Score more systems on each query's candidates into ``self._eval_state["runs"]``."""

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.eval_step(batch)

    def finish_eval(self, stage: str) -> dict[str, float]:
        state = self._eval_state
        runs = {name: run for name, run in state["runs"].items() if run}
        if state["first_stage"] is not None:
            runs["first_stage"] = {q: state["first_stage"][q] for q in state["runs"]["retrieval"]
                                   if q in state["first_stage"]}
        runs = merge_across_ranks(runs)
        evaluated = runs.get("retrieval", {})
        qrels = {q: rels for q, rels in state["data"].qrels.items() if q in evaluated}
        metrics = {f"{system}/{name}": value for system, run in runs.items()
                   for name, value in evaluate_run(qrels, run, self.hparams.metrics or DEFAULT_METRICS).items()}
        prefix = "val" if stage == "validate" else "test"
        for key, value in metrics.items():
            self.log(f"{prefix}/{key}", value, rank_zero_only=True)
        if stage == "test" and self.trainer.is_global_zero:
            self.write_outputs(runs, metrics, state["data"].name)
        self._eval_state = {}
        return metrics

    def write_outputs(self, runs: dict[str, dict], metrics: dict[str, float], data_name: str) -> None:
        from datamodules.readers import write_trec_run
        folder = Path(self.trainer.default_root_dir) / "runs"
        folder.mkdir(parents=True, exist_ok=True)
        data_name = data_name.replace("/", "-")
        for system, run in runs.items():
            write_trec_run(folder / f"{data_name}.{system}.trec", run, tag=f"zoo-{self.zoo_name}-{system}")
        (folder / f"{data_name}.metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))

    def on_validation_epoch_end(self) -> None:
        self.finish_eval("validate")

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self.finish_eval("test")
