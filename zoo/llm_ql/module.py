"""LLM-QL Stage 1: query-likelihood learning through the end token [E] (Attention Stop + corruption).

Each training pair becomes ``prompt(corrupted passage) · [E] · query · end``; query tokens attend
only to [E] and earlier query tokens, so everything the model needs from the passage must pass
through [E]'s hidden states, the position that Stage 2 pools as the embedding. The loss is the
mean next-token cross-entropy over the query tokens (and, with ``lm_on_document``, the passage
prompt too, as the reference code does). Evaluation: held-apart query cross-entropy, and at test
time the model reranks BM25 candidates by log P(q | d) beside word-based Dirichlet QL.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zoo.base import ZooModule
from zoo.blocks.distributed import merge_across_ranks
from zoo.blocks.metrics import evaluate_run
from zoo.llm_ql.backbone import TINY_LLAMA_MINILM, build_decoder
from zoo.llm_ql.ranker import DirichletQL, QLRanker, label_targets, target_log_probs
from zoo.llm_ql.sequences import DOC_PROMPT, QLSequenceBuilder

DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@100")


class QLPretrainModule(ZooModule):
    """Hooks to override: ``build_batch`` (pairs -> tensors), ``compute_losses``, ``rank_candidates``."""

    zoo_name = "llm_ql"
    card_notes = (
        "Stage 1 of LLM-QL (query likelihood through the end token). Choices, each a switch: pure QL loss "
        "(`lm_on_document=false`; the reference code also trains on the corrupted passage prompt: `true`); "
        "word-level corruption with `_` at `data.mask_prob=0.6`; [E] at a fixed index `doc_len` with "
        "left-padded prompts (`fixed_doc_len=true`, the reference layout) or right after each prompt; "
        "position ids count from each row's first real token (`pads_take_positions=true` is the "
        "reference's convention); long passages are cut inside the passage so the instruction and "
        "`Summarization:` cue survive (`truncate_prompt=true` cuts the prompt's end, as the reference). "
        "Only the document-to-query direction is implemented. Stage 2 is `zoo.dense` started from the "
        "exported `hf/` folder (`model=llm_ql_dense model.backbone=<this folder>/hf`)."
    )

    def __init__(
        self,
        backbone: str = TINY_LLAMA_MINILM,
        backbone_overrides: dict | None = None,
        attn_implementation: str = "sdpa",
        doc_template: str = DOC_PROMPT,
        query_template: str = "{query}",
        doc_len: int = 200,
        max_query_length: int = 32,
        fixed_doc_len: bool = True,
        truncate_prompt: bool = False,
        attention_stop: bool = True,
        lm_on_document: bool = False,
        pads_take_positions: bool = False,
        rerank_depth: int = 100,
        dirichlet_mu: float = 1000.0,
        eval_batch_size: int = 32,
        metrics: Sequence[str] | None = None,
        gradient_checkpointing: bool = False,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lm, self.tokenizer = build_decoder(backbone, backbone_overrides, attn_implementation)
        if gradient_checkpointing:
            self.lm.gradient_checkpointing_enable()
        self.builder = QLSequenceBuilder(self.tokenizer, doc_template, query_template, doc_len, max_query_length,
                                         fixed_doc_len, lm_on_document, truncate_prompt)
        self._eval_state: dict[str, Any] = {}

    def backbone_parts(self) -> tuple[Any, Any]:
        return self.lm, self.tokenizer

    def on_fit_start(self) -> None:
        self.lm.train()     # backbones are built in eval mode

    # -- hooks ---------------------------------------------------------------------------
    def build_batch(self, docs: Sequence[str], queries: Sequence[str]) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in self.builder.build(docs, queries).items()}

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``loss`` (mean CE over the label positions), ``query_ce`` (query and end tokens) and, when
        the passage prompt is a target, ``doc_ce``."""
        seq = self.build_batch(batch["doc"], batch["query"])
        targets = label_targets(seq)
        log_probs = target_log_probs(self.lm, seq, targets, self.hparams.attention_stop,
                                     self.hparams.pads_take_positions)
        positions = torch.arange(targets.shape[1], device=self.device)[None]
        on_query = targets & (positions > seq["e_pos"][:, None])
        losses = {"loss": -log_probs[targets].mean(), "query_ce": -log_probs[on_query].mean().detach()}
        if self.hparams.lm_on_document:
            losses["doc_ce"] = -log_probs[targets & ~on_query].mean().detach()
        return losses

    def ranker(self) -> QLRanker:
        return QLRanker(self.lm, self.builder, self.hparams.eval_batch_size, self.hparams.attention_stop,
                        self.hparams.pads_take_positions)

    def rank_candidates(self, queries: dict[str, str], candidates: dict[str, list[str]]) -> dict[str, dict]:
        """Runs of every system scored on the candidates: ``ql`` (this model) and ``dirichlet_ql``."""
        state = self._eval_state
        was_training = self.lm.training
        self.lm.eval()
        runs = {"ql": self.ranker().rerank(queries, candidates, state["data"].doc_text),
                "dirichlet_ql": state["dirichlet"].rerank(queries, candidates)}
        self.lm.train(was_training)
        return runs

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch["query"]), sync_dist=True)
        return losses["loss"]

    # -- evaluation ----------------------------------------------------------------------
    def _accumulate_ce(self, batch: dict[str, Any]) -> None:
        with torch.no_grad():
            losses = self.compute_losses(batch)
        n = len(batch["query"])
        self.accumulate_metrics({k: v.double() * n for k, v in losses.items()}, n)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._accumulate_ce(batch)

    def on_validation_epoch_end(self) -> None:
        self.reduce_metrics("val", prog_bar="query_ce")

    def on_test_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        data = dm.retrieval_data("test")
        self._eval_state = {"data": data, "first_stage": dm.first_stage_run("test") or {},
                            "dirichlet": DirichletQL({d: data.doc_text(d) for d in data.corpus},
                                                     self.hparams.dirichlet_mu),
                            "runs": {"ql": {}, "dirichlet_ql": {}, "first_stage": {}}}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._accumulate_ce(batch)
        state, depth = self._eval_state, self.hparams.rerank_depth
        queries = dict(zip(batch["qid"], batch["query"]))
        first = {q: state["first_stage"].get(q, {}) for q in queries}
        candidates = {q: sorted(run, key=run.get, reverse=True)[:depth] for q, run in first.items()}
        state["runs"]["first_stage"].update({q: {d: first[q][d] for d in candidates[q]} for q in queries})
        for system, run in self.rank_candidates(queries, candidates).items():
            state["runs"][system].update(run)

    def on_test_epoch_end(self) -> None:
        state = self._eval_state
        metrics = self.reduce_metrics("test")
        runs = merge_across_ranks(state["runs"])
        qrels = {q: rels for q, rels in state["data"].qrels.items() if q in runs["first_stage"]}
        for system, run in runs.items():
            for name, value in evaluate_run(qrels, run, self.hparams.metrics or DEFAULT_METRICS).items():
                metrics[f"test/{system}/{name}"] = value
                self.log(f"test/{system}/{name}", value, rank_zero_only=True)
        if self.trainer.is_global_zero:
            folder = Path(self.trainer.default_root_dir) / "runs"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{state['data'].name.replace('/', '-')}.metrics.json").write_text(
                json.dumps(metrics, indent=2, sort_keys=True))
        self.test_metrics = {k.removeprefix("test/"): v for k, v in metrics.items()}
        self._eval_state = {}

    # -- checkpoints ---------------------------------------------------------------------
    def export_decoder(self, folder: str | Path) -> Path:
        """A plain Transformers folder (weights + tokenizer): Stage 2's ``backbone``."""
        folder = Path(folder)
        self.lm.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return folder

    def save_pretrained(self, folder: str | Path, metrics: dict[str, float] | None = None,
                        data: str | None = None) -> Path:
        folder = super().save_pretrained(folder, metrics, data)
        self.export_decoder(folder / "hf")
        return folder
