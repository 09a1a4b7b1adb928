"""Ranking by query likelihood: the Stage-1 decoder's log P(q | d) and word-based Dirichlet QL."""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from zoo.llm_ql.masks import build_attention_stop_mask, position_ids_from_mask
from zoo.llm_ql.sequences import IGNORE, QLSequenceBuilder


def target_log_probs(model, batch: Mapping[str, Tensor], targets: Tensor, attention_stop: bool = True,
                     pads_take_positions: bool = False) -> Tensor:
    """(B, T) log-probability of each token at the positions where ``targets`` is True (0 elsewhere),
    each predicted from the position before it under the Attention Stop mask.

    The LM head runs only on the predicting positions: the full (B, T, vocab) logits would dominate
    memory for a large vocabulary.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    hidden_states = model.base_model(
        input_ids=input_ids,
        attention_mask=build_attention_stop_mask(attention_mask, batch["e_pos"], model.dtype, attention_stop),
        position_ids=position_ids_from_mask(attention_mask, pads_take_positions),
    ).last_hidden_state
    targets = targets.clone()
    targets[:, 0] = False                                  # nothing predicts the first token
    rows, cols = targets.nonzero(as_tuple=True)
    logits = model.get_output_embeddings()(hidden_states[rows, cols - 1]).float()
    picked = logits.log_softmax(-1).gather(1, input_ids[rows, cols][:, None])[:, 0]
    out = torch.zeros(input_ids.shape, dtype=picked.dtype, device=input_ids.device)
    return out.index_put((rows, cols), picked)


def label_targets(batch: Mapping[str, Tensor]) -> Tensor:
    return batch["labels"] != IGNORE


class QLRanker:
    """score(q, d) = Σ_t log P(q_t | prompt(d), [E], q_<t) with the Attention Stop mask and clean text
    (the end token is not scored; no length normalisation)."""

    def __init__(self, model, builder: QLSequenceBuilder, batch_size: int = 32, attention_stop: bool = True,
                 pads_take_positions: bool = False) -> None:
        self.model, self.builder, self.batch_size = model, builder, batch_size
        self.attention_stop, self.pads_take_positions = attention_stop, pads_take_positions

    @torch.no_grad()
    def score(self, query: str, docs: Sequence[str]) -> list[float]:
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(docs), self.batch_size):
            chunk = docs[start:start + self.batch_size]
            batch = {k: v.to(device) for k, v in self.builder.build(chunk, [query] * len(chunk)).items()}
            log_probs = target_log_probs(self.model, batch, batch["query_mask"], self.attention_stop,
                                         self.pads_take_positions)
            scores += log_probs.sum(1).tolist()
        return scores

    def rerank(self, queries: Mapping[str, str], candidates: Mapping[str, Sequence[str]],
               doc_text: Callable[[str], str]) -> dict[str, dict[str, float]]:
        return {qid: dict(zip(candidates[qid], self.score(queries[qid], [doc_text(d) for d in candidates[qid]])))
                for qid in queries if candidates.get(qid)}


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class DirichletQL:
    """Word-based query likelihood with Dirichlet smoothing:
    score(q, d) = Σ_{w∈q} log[(tf(w, d) + μ·P(w|C)) / (|d| + μ)].

    Query words absent from the collection are skipped (they would add log 0 to every document).
    """

    def __init__(self, docs: Mapping[str, str], mu: float = 1000.0) -> None:
        self.mu = mu
        self.tf = {d: Counter(words(text)) for d, text in docs.items()}
        self.length = {d: sum(tf.values()) for d, tf in self.tf.items()}
        self.collection = Counter()
        for tf in self.tf.values():
            self.collection.update(tf)
        self.total = sum(self.collection.values())

    def score(self, query: str, doc_ids: Sequence[str]) -> list[float]:
        terms = [w for w in words(query) if self.collection[w]]
        out = []
        for d in doc_ids:
            tf, length = self.tf[d], self.length[d]
            out.append(sum(math.log((tf[w] + self.mu * self.collection[w] / self.total) / (length + self.mu))
                           for w in terms))
        return out

    def rerank(self, queries: Mapping[str, str], candidates: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
        return {qid: dict(zip(candidates[qid], self.score(queries[qid], list(candidates[qid]))))
                for qid in queries if candidates.get(qid)}
