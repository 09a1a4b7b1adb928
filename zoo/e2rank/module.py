"""E2Rank: one embedding model for retrieval and listwise reranking (arXiv 2510.22733).

The listwise prompt (instruction, top-k candidates, query) is embedded as an enhanced
pseudo-query; every first-stage candidate is reranked by cosine with it. Training adds a
RankNet term on the pseudo-query scores to InfoNCE on the plain query embedding.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from zoo.blocks.losses import RankNetLoss
from zoo.blocks.prompts import ListwisePrompt
from zoo.dense.module import DenseRetrieverModule, positive_first


class E2RankModule(DenseRetrieverModule):
    """Hooks to override: ``format_query``, ``build_prompt``, ``contrastive_loss``,
    ``ranking_loss``, ``rerank_scores``."""

    zoo_name = "e2rank"
    card_notes = (
        "Deviations from the paper, each a config switch: the candidate order inside the training "
        "prompt is shuffled per sample (`data.prompt_order=shuffle`; the paper leaves it unspecified and "
        "a fixed positive slot would leak the label). RankNet averages over all valid pairs "
        "(`ranknet_reduction=pair_mean`, the reference code; `query_sum` is the paper's printed form). "
        "The InfoNCE positive is the teacher's top-1 (`positive_from_teacher=true`, the reference code). "
        "With a BERT-style encoder (MiniLM) pooling is mean and the prompt is plain text, not a chat template."
    )

    def __init__(
        self,
        max_prompt_length: int = 512,
        listwise: dict | None = None,
        train_prompt_docs: int | None = None,
        temperature: float = 0.03,
        ranknet_scale: float = 10.0,
        ranknet_reduction: str = "pair_mean",
        lambda_ranknet: float = 2.0,
        use_infonce: bool = True,
        use_ranknet: bool = True,
        use_listwise_prompt: bool = True,
        positive_from_teacher: bool = True,
        **base: Any,
    ) -> None:
        super().__init__(temperature=temperature, **base)
        self.prompt = ListwisePrompt(**(listwise or {}))
        self.ranknet = RankNetLoss(ranknet_scale, ranknet_reduction)

    # -- hooks ---------------------------------------------------------------------------
    def build_prompt(self, query: str, docs: Sequence[str], num_docs: int | None = None) -> str:
        """The listwise pseudo-query; ``num_docs`` caps the candidates shown (default: the config's)."""
        prompt = self.prompt if num_docs is None else ListwisePrompt(**{**self.prompt.as_dict(), "num_docs": num_docs})
        return prompt.build(query, docs, self.encoder.tokenizer, max_tokens=self.hparams.max_prompt_length)

    def ranking_loss(self, scores: Tensor, order: Tensor) -> Tensor:
        return self.ranknet(scores, order)

    def rerank_scores(self, pseudo_queries: Tensor, candidate_docs: Tensor) -> Tensor:
        """Cosine of each pseudo-query (B, D) with its candidates (B, K, D) -> (B, K)."""
        return torch.einsum("bd,bkd->bk", pseudo_queries, candidate_docs)

    # -- embedding -----------------------------------------------------------------------
    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        return self.encoder.embed(prompts, self.hparams.max_prompt_length)

    # -- training ------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """batch: query (B), docs (B*K, each query's K documents in prompt order), order (B, K)
        teacher ranking as indices into the query's docs, positive (B) gold positive index."""
        order: Tensor = batch["order"]
        n_queries, group = order.shape
        q = self.embed_queries(batch["query"])
        d = self.embed_docs(batch["docs"])
        losses: dict[str, Tensor] = {}
        total = q.new_zeros(())
        if self.hparams.use_infonce:
            positive = order[:, 0] if self.hparams.positive_from_teacher else batch["positive"]
            losses["infonce"] = self.contrastive_loss(q, d[positive_first(positive, group)], batch)
            total = total + losses["infonce"]
        if self.hparams.use_ranknet:
            if self.hparams.use_listwise_prompt:
                docs = batch["docs"]
                prompts = [self.build_prompt(query, docs[i * group:(i + 1) * group],
                                             num_docs=self.hparams.train_prompt_docs or group)
                           for i, query in enumerate(batch["query"])]
                anchor = self.embed_prompts(prompts)
            else:
                anchor = q
            scores = self.rerank_scores(anchor, d.view(n_queries, group, -1))
            losses["ranknet"] = self.ranking_loss(scores, order)
            total = total + self.hparams.lambda_ranknet * losses["ranknet"]
        losses["loss"] = total
        return losses

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def rerank(self, queries: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[dict[str, float]]:
        """E2Rank reranking: each query's prompt shows its top candidates; all candidates are scored
        against the prompt embedding, reusing the cached document embeddings."""
        state = self._eval_state
        rows = [[state["row"][d] for d in ids] for ids in candidates]
        prompts = [self.build_prompt(query, [state["texts"][r] for r in doc_rows])
                   for query, doc_rows in zip(queries, rows)]
        anchors = self.embed_prompts(prompts).float().cpu()
        return [dict(zip(ids, self.rerank_scores(anchor[None], state["emb"][doc_rows][None])[0].tolist()))
                for ids, doc_rows, anchor in zip(candidates, rows, anchors)]

    def extend_eval_runs(self, batch: dict[str, Any], candidates: list[list[str]]) -> None:
        kept = [i for i, ids in enumerate(candidates) if ids]
        reranked = self.rerank([batch["query"][i] for i in kept], [candidates[i] for i in kept])
        runs = self._eval_state["runs"].setdefault("rerank", {})
        for i, run in zip(kept, reranked):
            runs[batch["qid"][i]] = run
