"""GenCRF: multi-prompt LLM reformulation, LLM clustering into <= 3 intent queries, weighted dense
aggregation and a QERM regenerate-or-stop loop (arXiv 2409.10909). Training-free at test time.

One round for a query q: |P| prompts x N samples -> Q_gen; one clustering call -> Q_final (1..3
refined queries; parsed tolerantly, embedding-clustering fallback when unusable); for score modes
one scoring call -> [s_1..s_K]; the retrieval vector v = w0 E(q) + sum_i w_i E(q_f,i) (``dc``
encodes one concatenated text instead); top-k by dot product over the corpus.

Modes: ``q_init`` (baseline: E(q) alone), ``dc``, ``fw``, ``simdw``, ``scoredw``, ``scoredw_ft``
(scores from ``scorer_backbone``, a fine-tuned copy; the generation LLM when unset) and
``scoredw_ft_qerm`` (round 1 for the whole split, epsilon = mean first-round QERM logit unless
``epsilon`` is set, then rounds 2..M for the queries below it, at test epoch end).
"""
from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from datamodules.readers import RetrievalData
from zoo.backbones import build_backbone
from zoo.base import ZooModule
from zoo.blocks.encoder import EmbeddingEncoder
from zoo.blocks.llm import ScoreCache, chat_prompt, label_logprobs
from zoo.blocks.metrics import per_query
from zoo.blocks.retrieval import build_index, encode_corpus
from zoo.blocks.search_env import HashedBagOfWords
from zoo.gencrf.aggregation import (
    aggregate,
    chosen_round,
    dc_text,
    fw_weights,
    passes,
    scoredw_weights,
    simdw_weights,
)
from zoo.gencrf.parsing import cluster_fallback, medoid, parse_clusters, parse_scores

log = logging.getLogger(__name__)

MODES = ("q_init", "dc", "fw", "simdw", "scoredw", "scoredw_ft", "scoredw_ft_qerm")
SCORE_MODES = ("scoredw", "scoredw_ft", "scoredw_ft_qerm")
SCORE_SOURCES = ("generate", "expected")

_TAIL = "Provide a clear and concise response based on the original query.\nBelow is the query: {query}"
# Appendix B's generation prompts (paraphrased in the spec); clarity_enhancement is the ablation's 4th.
PROMPTS = {
    "contextual_expansion": (
        "You are a contextual expansion expert. Understand the core intent of the query and give a refined, "
        "contextually expanded answer. " + _TAIL),
    "detail_specific": (
        "You are a detail-oriented expert. Understand the core intent of the query and give a refined, detailed "
        "answer focusing on particular details or subtopics directly related to the query. " + _TAIL),
    "aspect_specific": (
        "You are an aspect-specific expert. Understand the core intent of the query and give a refined answer "
        "focusing on one specific aspect or dimension of the topic. " + _TAIL),
    "clarity_enhancement": (
        "You are a query clarity expert. Reformulate the query to remove ambiguity and make it clearer and more "
        "specific. " + _TAIL),
}
CLUSTER_PROMPT = (
    "You are an expert in query refinement. Review the original query and the generated texts below. Cluster "
    "the generated texts into 1 to 3 groups by their similarity and relevance, choosing the number of groups "
    "dynamically and focusing on how they relate to the original query. For each cluster, write one refined "
    "query that merges the original query with that cluster's texts, keeping the information useful for "
    "retrieval.\nOriginal query: {query}\nGenerated texts:\n{texts}\n"
    "Output only JSON with at most 3 entries: {{\"cluster1\": \"...\", \"cluster2\": \"...\", \"cluster3\": \"...\"}}")
SCORE_PROMPT = (
    "You are a strict judge of search queries. Score each refined query from 1 to 100 against the original "
    "query on relevance, specificity, clarity, comprehensiveness and usefulness for retrieval. Do not give "
    "high scores by default: relevant but unspecific 40-60; relevant and specific 70-100; unclear or "
    "incomplete 10-30.\nOriginal query: {query}\n{clusters}\n"
    "Return only a list of {k} numbers: [score_cluster1, ...]")
EXPECTED_SCORE_PROMPT = (
    "Rate how good the refined query is for retrieving documents about the original query, on a scale from 1 "
    "to 10.\nOriginal query: {query}\nRefined query: {refined}\nAnswer with one number.")


def seeded_generator(*parts: Any) -> torch.Generator:
    """A generator seeded from the query and round alone, so samples do not depend on batching or rank."""
    return torch.Generator().manual_seed(zlib.crc32(":".join(map(str, parts)).encode()))


class TextEmbedder(nn.Module):
    """``hashed`` (deterministic hashed bag of words, no weights) or a Transformers encoder."""

    def __init__(self, name: str, pooling: str = "mean", normalize: bool = True, max_length: int = 256,
                 hashed_dim: int = 256) -> None:
        super().__init__()
        self.name = name
        self.max_length = max_length
        if name == "hashed":
            self.hashed: HashedBagOfWords | None = HashedBagOfWords(dim=hashed_dim)
            self.encoder = None
        else:
            self.hashed = None
            model, tokenizer = build_backbone(name)
            self.encoder = EmbeddingEncoder(model, tokenizer, pooling=pooling, normalize=normalize,
                                            max_length=max_length).requires_grad_(False)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if self.hashed is not None:
            return self.hashed(list(texts))
        return self.encoder.encode(list(texts), batch_size=32)

    def encode_corpus(self, doc_ids: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        if self.hashed is not None:
            return self.hashed(list(texts))
        return encode_corpus(self.encoder, doc_ids, texts, max_length=self.max_length)


class GenCRFModule(ZooModule):
    """Hooks to override: ``generation_prompts``, ``reformulate``, ``cluster``, ``score``,
    ``dynamic_weights``, ``query_vectors``, ``qerm_logits``."""

    zoo_name = "gencrf"
    card_notes = (
        "Aggregation sums retriever query embeddings; ScoreDW weights are s/score_scale (spec ambiguity 2). "
        "When the LLM's clustering JSON or score list is unusable, the logged fallbacks apply: agglomerative "
        "clustering of Q_gen (medoid prefixed by q_init) and scores round(100 cos(S(q), S(q_f))). "
        "QERM rounds: M counts the first round; when no round reaches epsilon the highest-logit round is "
        "returned (on_no_pass=best). scoredw_ft without scorer_backbone uses the untuned LLM.")

    def __init__(
        self,
        mode: str = "scoredw",
        llm: str = "tiny-llama",
        llm_overrides: dict | None = None,
        scorer_backbone: str | None = None,
        dtype: str = "float32",
        retriever: str = "hashed",
        retriever_pooling: str = "mean",
        retriever_normalize: bool = True,
        retriever_max_length: int = 256,
        sim_encoder: str = "hashed",
        sim_pooling: str = "mean",
        hashed_dim: int = 256,
        prompts: list | None = None,
        num_samples: int = 2,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 128,
        cluster_max_new_tokens: int = 256,
        score_max_new_tokens: int = 32,
        max_clusters: int = 3,
        max_text_words: int = 80,
        w0: float = 0.7,
        sim_threshold: float = 0.2,
        score_threshold: float = 60.0,
        score_scale: float = 100.0,
        score_source: str = "generate",
        merge_cos: float = 0.9,
        qerm_path: str | None = None,
        qerm_backbone: str = "tiny-bert",
        qerm_rounds: int = 2,
        epsilon: float | None = None,
        on_no_pass: str = "best",
        compare_modes: list | None = None,
        retrieval_depth: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for key, value, allowed in (("mode", mode, MODES), ("score_source", score_source, SCORE_SOURCES),
                                    ("on_no_pass", on_no_pass, ("best", "last"))):
            if value not in allowed:
                raise ValueError(f"unknown model.{key} '{value}'; choose one of {', '.join(allowed)}")
        unknown = [p for p in (prompts or []) if p not in PROMPTS]
        if unknown:
            raise ValueError(f"model.prompts: unknown prompt(s) {unknown}; choose from {', '.join(PROMPTS)}")
        bad = [m for m in (compare_modes or []) if m not in MODES or m == "scoredw_ft_qerm"]
        if bad:
            raise ValueError(f"model.compare_modes: {bad} not allowed; choose from {', '.join(MODES[:-1])}")
        if qerm_rounds < 1:
            raise ValueError("model.qerm_rounds counts the first round and must be >= 1")
        self.save_hyperparameters()
        self.llm, self.tokenizer = build_backbone(llm, causal_lm=True, config_overrides=llm_overrides, dtype=dtype)
        self.llm.requires_grad_(False)
        self.scorer, self.scorer_tokenizer = self.llm, self.tokenizer
        if scorer_backbone:
            self.scorer, self.scorer_tokenizer = build_backbone(scorer_backbone, causal_lm=True, dtype=dtype)
            self.scorer.requires_grad_(False)
        self.retriever = TextEmbedder(retriever, retriever_pooling, retriever_normalize, retriever_max_length,
                                      hashed_dim)
        same = (sim_encoder, sim_pooling, True) == (retriever, retriever_pooling, retriever_normalize)
        self.sim_encoder = self.retriever if same else TextEmbedder(sim_encoder, sim_pooling, True,
                                                                     retriever_max_length, hashed_dim)
        self.qerm = None
        if mode == "scoredw_ft_qerm":
            from zoo.gencrf.qerm import QERMModule
            if qerm_path:
                self.qerm = QERMModule.from_pretrained(qerm_path)
            else:
                log.warning("GenCRF: model.qerm_path is unset; the QERM is an untrained %s (train one with "
                            "model=gencrf_qerm and pass its folder)", qerm_backbone)
                self.qerm = QERMModule(backbone=qerm_backbone)
            self.qerm.requires_grad_(False)
        self.cache = ScoreCache()
        self.index = None
        self.data: RetrievalData | None = None
        self.llm_calls = 0
        self.fallbacks = {"cluster": 0, "score": 0}
        self._first_rounds: list[dict[str, Any]] = []
        self.test_metrics: dict[str, float] = {}

    def configure_optimizers(self) -> None:
        return None

    @property
    def prompt_names(self) -> list[str]:
        return list(self.hparams.prompts or ["contextual_expansion", "detail_specific", "aspect_specific"])

    # -- corpus ------------------------------------------------------------------------------
    def prepare_index(self, data: RetrievalData) -> None:
        """Encode the corpus with the retriever (cached on disk for Transformers encoders)."""
        doc_ids = list(data.corpus)
        embeddings = self.retriever.encode_corpus(doc_ids, [data.doc_text(d) for d in doc_ids])
        self.index = build_index(doc_ids, embeddings)
        self.data = data

    def retrieve(self, qids: Sequence[str], vectors: torch.Tensor) -> dict[str, dict[str, float]]:
        if self.index is None:
            raise RuntimeError("GenCRF: call prepare_index(data) (done at test start) before retrieving")
        return self.index.search_run(list(qids), vectors, self.hparams.retrieval_depth)

    # -- LLM calls ---------------------------------------------------------------------------
    def _short(self, text: str) -> str:
        return " ".join(text.split()[:self.hparams.max_text_words])

    def generation_prompts(self, query: str) -> list[str]:
        """One chat prompt per reformulation prompt in P."""
        return [chat_prompt(self.tokenizer, PROMPTS[name].format(query=query)) for name in self.prompt_names]

    def _generate(self, model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                  generator: torch.Generator | None = None, sample: bool = False) -> list[str]:
        from zoo.blocks.rl.rollout import RolloutEngine

        engine = RolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens, greedy=not sample,
                               temperature=self.hparams.temperature, top_p=self.hparams.top_p)
        self.llm_calls += len(prompts)
        return [t.strip() for t in engine.generate(prompts, generator=generator).texts]

    def reformulate(self, qid: str, query: str, round_index: int = 0) -> list[str]:
        """Q_gen: N samples for each prompt (|P| * N texts), seeded by (seed, qid, round)."""
        prompts = [p for p in self.generation_prompts(query) for _ in range(self.hparams.num_samples)]
        return self._generate(self.llm, self.tokenizer, prompts, self.hparams.max_new_tokens,
                              generator=seeded_generator(self.hparams.seed, qid, round_index), sample=True)

    def cluster(self, queries: Sequence[str], generated: Sequence[Sequence[str]]) -> list[list[str]]:
        """Q_final per query: the LLM's clusters (greedy), else the embedding fallback."""
        prompts = [chat_prompt(self.tokenizer, CLUSTER_PROMPT.format(
            query=q, texts="\n".join(f"{i + 1}. {self._short(t)}" for i, t in enumerate(gen))))
            for q, gen in zip(queries, generated)]
        answers = self._generate(self.llm, self.tokenizer, prompts, self.hparams.cluster_max_new_tokens)
        finals = []
        for query, gen, answer in zip(queries, generated, answers):
            parsed = parse_clusters(answer, self.hparams.max_clusters)
            if parsed is None:
                self.fallbacks["cluster"] += 1
                parsed = self.fallback_clusters(query, gen)
            finals.append(parsed)
        return finals

    def fallback_clusters(self, query: str, generated: Sequence[str]) -> list[str]:
        """Agglomerative clusters of S(Q_gen); each cluster's medoid text prefixed by q_init."""
        texts = [t for t in generated if t.strip()]
        if not texts:
            return [query]
        embeddings = self.sim_encoder.encode(texts)
        groups = cluster_fallback(texts, embeddings, self.hparams.max_clusters, self.hparams.merge_cos)
        return list(dict.fromkeys(f"{query} {self._short(texts[medoid(g, embeddings)])}" for g in groups))

    def score(self, queries: Sequence[str], finals: Sequence[Sequence[str]]) -> list[list[float]]:
        """Raw scores s_i in [1, 100] per refined query (one call per query, or per refined query
        with ``score_source=expected``); a missing score is dropped later, an unusable answer falls back."""
        if self.hparams.score_source == "expected":
            return self.expected_scores(queries, finals)
        prompts = [chat_prompt(self.scorer_tokenizer, SCORE_PROMPT.format(
            query=q, k=len(f), clusters="\n".join(f"Cluster {i + 1}: {self._short(t)}" for i, t in enumerate(f))))
            for q, f in zip(queries, finals)]
        answers = self._generate(self.scorer, self.scorer_tokenizer, prompts, self.hparams.score_max_new_tokens)
        scores = []
        for query, final, answer in zip(queries, finals, answers):
            parsed = parse_scores(answer)
            if parsed is None:
                self.fallbacks["score"] += 1
                parsed = self.fallback_scores(query, final)
            scores.append(parsed)
        return scores

    def fallback_scores(self, query: str, finals: Sequence[str]) -> list[float]:
        return [float(round(100 * s)) for s in self.similarities(query, finals)]

    def expected_scores(self, queries: Sequence[str], finals: Sequence[Sequence[str]]) -> list[list[float]]:
        """10 * E[rating] with the rating's distribution read from the label tokens "1".."10"."""
        pairs = [(q, f) for q, final in zip(queries, finals) for f in final]
        prompts = [chat_prompt(self.scorer_tokenizer, EXPECTED_SCORE_PROMPT.format(query=q, refined=self._short(f)))
                   for q, f in pairs]
        self.llm_calls += len(prompts)
        logp = label_logprobs(self.scorer, self.scorer_tokenizer, prompts, [str(k) for k in range(1, 11)],
                              cache=self.cache)
        expected = (logp.softmax(-1) * torch.arange(1, 11, dtype=torch.float32)).sum(-1) * 10
        values, out = expected.tolist(), []
        for final in finals:
            out.append(values[:len(final)])
            values = values[len(final):]
        return out

    # -- aggregation ---------------------------------------------------------------------------
    def similarities(self, query: str, finals: Sequence[str]) -> list[float]:
        """cos(S(q_init), S(q_f,i))."""
        emb = torch.nn.functional.normalize(self.sim_encoder.encode([query, *finals]).float(), dim=-1)
        return (emb[1:] @ emb[0]).tolist()

    def dynamic_weights(self, mode: str, query: str, finals: Sequence[str],
                        scores: Sequence[float] | None) -> list[float]:
        hp = self.hparams
        if mode == "fw":
            return fw_weights(hp.w0, len(finals))
        if mode == "simdw":
            return simdw_weights(self.similarities(query, finals), hp.sim_threshold)
        if mode in SCORE_MODES:
            return scoredw_weights(scores, len(finals), hp.score_threshold, hp.score_scale)
        raise ValueError(f"mode '{mode}' has no dynamic weights")

    def query_vectors(self, mode: str, queries: Sequence[str], finals: Sequence[Sequence[str]],
                      scores: Sequence[Sequence[float] | None]) -> tuple[torch.Tensor, list[list[float]]]:
        """Retrieval vectors [B, D] and each query's dynamic weights (empty for q_init and dc)."""
        if mode == "q_init":
            return self.retriever.encode(queries), [[] for _ in queries]
        if mode == "dc":
            return self.retriever.encode([dc_text(q, f) for q, f in zip(queries, finals)]), [[] for _ in queries]
        flat = [t for q, f in zip(queries, finals) for t in (q, *f)]
        embeddings = self.retriever.encode(flat)
        vectors, weights, row = [], [], 0
        for query, final, score in zip(queries, finals, scores):
            w = self.dynamic_weights(mode, query, final, score)
            vectors.append(aggregate(embeddings[row], embeddings[row + 1:row + 1 + len(final)], self.hparams.w0, w))
            weights.append(w)
            row += 1 + len(final)
        return torch.stack(vectors), weights

    def qerm_logits(self, queries: Sequence[str], finals: Sequence[Sequence[str]]) -> list[float]:
        return self.qerm.score(queries, finals)

    # -- one round -----------------------------------------------------------------------------
    def run_round(self, qids: Sequence[str], queries: Sequence[str], round_index: int = 0,
                  modes: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Generate, cluster, score (when a mode needs it), aggregate and retrieve, for every mode in
        ``modes`` (default: the configured mode) from the same Q_final. One dict per query."""
        modes = list(modes or [self.hparams.mode])
        rows = [{"qid": qid, "query": q, "round": round_index, "calls": 0, "runs": {}, "weights": {}}
                for qid, q in zip(qids, queries)]
        if any(m != "q_init" for m in modes):
            for row in rows:
                before = self.llm_calls
                row["generated"] = self.reformulate(row["qid"], row["query"], round_index)
                row["calls"] += self.llm_calls - before
            before = self.llm_calls
            finals = self.cluster(queries, [r["generated"] for r in rows])
            share = (self.llm_calls - before) / len(rows)
            scores: list[Any] = [None] * len(rows)
            if any(m in SCORE_MODES for m in modes):
                before = self.llm_calls
                scores = self.score(queries, finals)
                share += (self.llm_calls - before) / len(rows)
            for row, final, score in zip(rows, finals, scores):
                row.update(finals=final, scores=score)
                row["calls"] += share
        for mode in modes:
            finals = [r.get("finals", []) for r in rows]
            vectors, weights = self.query_vectors(mode, queries, finals, [r.get("scores") for r in rows])
            for row, w, (_, run) in zip(rows, weights, self.retrieve(qids, vectors).items()):
                row["runs"][mode], row["weights"][mode] = run, w
        return rows

    # -- evaluation ----------------------------------------------------------------------------
    def ndcg(self, qid: str, run: dict[str, float], metrics: Sequence[str] = ("ndcg@10", "recall@100")) -> dict:
        values = per_query({qid: self.data.qrels.get(qid, {})}, {qid: run}, metrics)
        return {m: values[m].get(qid) for m in metrics}

    def on_test_epoch_start(self) -> None:
        self.prepare_index(self.trainer.datamodule.retrieval_data("test"))
        self.fallbacks = {"cluster": 0, "score": 0}
        self._first_rounds = []

    def _round_modes(self) -> list[str]:
        mode = self.hparams.mode
        main = "scoredw_ft" if mode == "scoredw_ft_qerm" else mode
        return list(dict.fromkeys([main, "q_init", *(self.hparams.compare_modes or [])]))

    @torch.no_grad()
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rows = self.run_round(batch["qid"], batch["query"], 0, self._round_modes())
        if self.hparams.mode == "scoredw_ft_qerm":
            for row, z in zip(rows, self.qerm_logits(batch["query"], [r["finals"] for r in rows])):
                row["qerm_logit"] = z
            self._first_rounds.extend(rows)
            return
        for row in rows:
            self._account(row, [row])

    def _account(self, final: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
        """Per-query metric sums of the returned round (+ baseline and compared modes from round 1)."""
        main = "scoredw_ft" if self.hparams.mode == "scoredw_ft_qerm" else self.hparams.mode
        values = self.ndcg(final["qid"], final["runs"][main])
        if values["ndcg@10"] is None:   # no judged relevant document: trec_eval skips the query
            return
        first = rounds[0]
        sums = {**values, "llm_calls": sum(r["calls"] for r in rounds), "rounds": len(rounds),
                "baseline/ndcg@10": self.ndcg(first["qid"], first["runs"]["q_init"])["ndcg@10"]}
        for mode in self.hparams.compare_modes or []:
            sums[f"compare/{mode}/ndcg@10"] = self.ndcg(first["qid"], first["runs"][mode])["ndcg@10"]
        if "finals" in final:
            weights = final["weights"][main]
            sums["clusters"] = len(final["finals"])
            if weights:
                sums["kept_fraction"] = sum(w > 0 for w in weights) / len(weights)
        self.accumulate_metrics(sums, 1)

    def qerm_epsilon(self) -> float:
        """The configured epsilon, else the mean first-round logit over every rank's queries."""
        if self.hparams.epsilon is not None:
            return float(self.hparams.epsilon)
        logits = torch.tensor([r["qerm_logit"] for r in self._first_rounds], dtype=torch.float64)
        total = self.trainer.strategy.reduce(logits.sum().to(self.device), reduce_op="sum")
        count = self.trainer.strategy.reduce(torch.tensor(float(len(logits)), device=self.device), reduce_op="sum")
        return float(total) / max(float(count), 1.0)

    def qerm_loop(self, first_rounds: list[dict[str, Any]], epsilon: float) -> list[list[dict[str, Any]]]:
        """Rounds 2..M for the queries whose latest round is below epsilon (Algorithm 1)."""
        history = [[row] for row in first_rounds]
        for round_index in range(1, self.hparams.qerm_rounds):
            pending = [h for h in history if not passes(h[-1]["qerm_logit"], epsilon)]
            if not pending:
                break
            rows = self.run_round([h[0]["qid"] for h in pending], [h[0]["query"] for h in pending], round_index,
                                  ["scoredw_ft"])
            for h, row, z in zip(pending, rows, self.qerm_logits([r["query"] for r in rows],
                                                                 [r["finals"] for r in rows])):
                row["qerm_logit"] = z
                h.append(row)
        return history

    def on_test_epoch_end(self) -> None:
        if self.hparams.mode == "scoredw_ft_qerm" and self._first_rounds:
            epsilon = self.qerm_epsilon()
            for rounds in self.qerm_loop(self._first_rounds, epsilon):
                pick = chosen_round([r["qerm_logit"] for r in rounds], epsilon, self.hparams.on_no_pass)
                self._account(rounds[pick], rounds)
            self.log("test/epsilon", epsilon)
        if any(self.fallbacks.values()):
            log.warning("GenCRF fallbacks used (LLM output unusable): clustering %d, scoring %d",
                        self.fallbacks["cluster"], self.fallbacks["score"])
        self.accumulate_metrics({"cluster_fallback_rate": self.fallbacks["cluster"],
                                 "score_fallback_rate": self.fallbacks["score"]}, 0)
        self.test_metrics = self.reduce_metrics("test", prog_bar="ndcg@10")

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Round-1 outputs with every intermediate (texts, weights, run, nDCG@10): QERM training rows."""
        if self.index is None:
            self.prepare_index(self.trainer.datamodule.retrieval_data("predict"))
        main = "scoredw_ft" if self.hparams.mode == "scoredw_ft_qerm" else self.hparams.mode
        rows = self.run_round(batch["qid"], batch["query"], 0, [main])
        for row in rows:
            row["ndcg@10"] = self.ndcg(row["qid"], row["runs"][main])["ndcg@10"]
        return rows
