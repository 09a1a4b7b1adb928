"""CLUE: multilevel usefulness labels for clicked documents from a top-down cascade of binary LLM
judgments that see the search context and the user's behaviour (arXiv 2506.08626).

Stage classifiers (``stage_classifier``):
- ``setwise_generate`` (the official code): one chat per query and stage listing the still-unlabelled
  clicked documents as [1], [2], ...; V sampled replies (temperature 0.7) are parsed as bracket lists
  (a reply without one gets a repair turn asking for the bare list); a document gets the level when
  at least ``vote_threshold`` voters chose it.
- ``pointwise_logit``: one short yes/no prompt per document and stage, m_k = log P(yes) - log P(no);
  the V votes are seeded Bernoulli draws with p = sigmoid(m_k - t_k), keyed by (query, document,
  stage, voter), or V copies of 1[m_k > t_k] with ``vote_sampling=false``. Order-free.
- ``oracle``: g_k = 1[u >= k] from the gold label (tests, upper bounds).

``method=single_prompt`` is the baseline labeller: one prompt per document asking for the level
directly (level-token log-probs, argmax; or V sampled replies, median level).

Hooks to override: ``generate`` (the LLM's replies), ``stage_margins`` (pointwise m_k), ``decide``
(one stage for many queries), the prompt builders (``document_block``, ``setwise_messages``,
``pointwise_prompt``, ``single_prompt``) and ``label`` (a batch of queries -> labels).
"""
from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from zoo.backbones import build_backbone
from zoo.base import ZooModule
from zoo.blocks.llm import ScoreCache, chat_messages, chat_prompt, label_logprobs
from zoo.usefulness_labels.cascade import (
    StageAnswer,
    StageRequest,
    majority,
    parse_bracket_ids,
    parse_level,
    run_cascade,
)
from zoo.usefulness_labels.judge import JUDGE_PRESET, build_judge
from zoo.usefulness_labels.metrics import agreement

METHODS = ("cascade", "single_prompt")
STAGE_CLASSIFIERS = ("setwise_generate", "pointwise_logit", "oracle")
ASPECTS = "helpful, detailed, relevant, encyclopedic, specific and comprehensive"

SYSTEM = ("You are an information retrieval assistant. You score the usefulness of documents for a searcher, "
          "according to the searcher's information need and query.")
ANCHOR_INTRO = "For reference, these documents of the same query were already judged to deserve usefulness score {level}:"
SETWISE_INTRO = ("{context}The query is: {query}. I will give you {count} documents, each marked by [number]. "
                 "Select zero, one or several documents that are most useful for answering this query.")
ACK = "Okay, please provide the documents."
RECEIVED = "Received [{j}]."
TOP_INSTRUCTION = ("Select the most useful documents: those that effectively satisfy the information need and give "
                   "comprehensive and accurate information, so that they clearly improve the searcher's experience.")
STAGE_INSTRUCTION = "Select the documents that deserve usefulness score {level} on a scale from {low} to {high}."
OUTPUT_FORMAT = ("Consider whether each document is " + ASPECTS + ". Think first, then give the selected documents' "
                 "numbers in brackets, for example [1][2], or [] if none.")
REPAIR = "Summarise your answer above as the selected numbers in brackets only, for example [1][2], or [] if none."
POINTWISE_TOP = "Is this document among the most useful for the searcher? Answer Yes or No."
POINTWISE_STAGE = "Does this document deserve usefulness score {level} or higher on a scale from {low} to {high}? Answer Yes or No."
SINGLE = ("How useful is this document for the searcher, on a scale from {low} (not useful) to {high} (very useful)? "
          "Answer with one number.")
PROMPT_TEXTS = (SYSTEM, ANCHOR_INTRO, SETWISE_INTRO, ACK, RECEIVED, TOP_INSTRUCTION, STAGE_INSTRUCTION, OUTPUT_FORMAT,
                REPAIR, POINTWISE_TOP, POINTWISE_STAGE, SINGLE,
                "Information need: Query: Title: Snippet: Text: Behaviour: Document:")


def seeded_uniform(*key: Any) -> float:
    """A uniform draw in [0, 1) fixed by its key (no RNG state, so order-free)."""
    digest = hashlib.blake2b(":".join(str(k) for k in key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


class CLUEModule(ZooModule):
    """Training-free usefulness labeller; ``test_step`` logs agreement with the users' labels."""

    zoo_name = "usefulness_labels"
    card_notes = (
        "Interpretations (the paper's experiment sections were not read): the information need is the task "
        "description + query; `pointwise_logit` (yes/no label log-probs, seeded Bernoulli votes) is the zoo's "
        "deterministic stage classifier beside the code's `setwise_generate`; the single-prompt baseline asks "
        "for the level directly. The history of earlier clicks appears only with anchors (history_in_main_docs)."
    )

    def __init__(
        self,
        backbone: str = JUDGE_PRESET,
        backbone_overrides: dict | None = None,
        dtype: str = "float32",
        levels: list | None = None,
        method: str = "cascade",
        stage_classifier: str = "pointwise_logit",
        voters: int = 5,
        vote_threshold: int | None = None,
        thresholds: float | list = 0.0,
        vote_sampling: bool = True,
        use_behaviour: bool = True,
        use_context: bool = True,
        use_anchors: bool = True,
        history_in_main_docs: bool = False,
        doc_max_chars: int = 8000,
        temperature: float = 0.7,
        max_new_tokens: int = 64,
        repair: bool = True,
        repair_max_new_tokens: int = 16,
        generate_batch_size: int = 16,
        yes_no_labels: list | None = None,
        score_batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown model.method '{method}'; choose one of {', '.join(METHODS)}")
        if stage_classifier not in STAGE_CLASSIFIERS:
            raise ValueError(f"unknown model.stage_classifier '{stage_classifier}'; "
                             f"choose one of {', '.join(STAGE_CLASSIFIERS)}")
        levels = sorted(int(v) for v in (levels or [0, 1, 2, 3, 4]))
        if len(levels) < 2 or len(set(levels)) != len(levels):
            raise ValueError(f"model.levels must hold at least two distinct levels, got {levels}")
        if voters < 1:
            raise ValueError(f"model.voters must be >= 1, got {voters}")
        threshold = majority(voters) if vote_threshold is None else vote_threshold
        if not 1 <= threshold <= voters:
            raise ValueError(f"model.vote_threshold must be in 1..{voters} (model.voters), got {vote_threshold}")
        if isinstance(thresholds, (list, tuple)) and len(thresholds) != len(levels) - 1:
            raise ValueError(f"model.thresholds needs one value per stage, i.e. for levels {levels[1:]}; "
                             f"got {len(thresholds)}")
        self.save_hyperparameters()
        self.levels = levels
        self.threshold = threshold
        if backbone == JUDGE_PRESET:
            self.llm, self.tokenizer = build_judge(PROMPT_TEXTS, backbone_overrides)
        else:
            self.llm, self.tokenizer = build_backbone(backbone, causal_lm=True, config_overrides=backbone_overrides,
                                                      dtype=dtype)
        self.llm.requires_grad_(False)
        self.cache = ScoreCache()
        self.llm_calls = 0
        self._generate_calls = 0
        self._results: list[dict[str, Any]] = []
        self.test_metrics: dict[str, float] = {}

    def backbone_parts(self) -> tuple[Any, Any]:
        return self.llm, self.tokenizer

    def configure_optimizers(self) -> None:
        return None

    # -- prompts ---------------------------------------------------------------------------------
    def context_line(self, row: dict[str, Any]) -> str:
        return f"Information need: {row['task']} " if self.hparams.use_context else ""

    def document_block(self, doc: dict[str, Any], j: int | None = None, anchor: bool = False) -> str:
        """Title, snippet, text (cut to ``doc_max_chars``), and behaviour (+ history for anchors)."""
        text = " ".join(str(doc["text"]).split())[:self.hparams.doc_max_chars]
        head = f"[{j}] " if j is not None else ""
        block = f"{head}Title: {doc['title']} Snippet: {doc['snippet']} Text: {text}"
        if self.hparams.use_behaviour:
            block += f" Behaviour: {doc['behaviour']}"
            if anchor or self.hparams.history_in_main_docs:
                block += f" {doc['history']}"
        return block

    def ordered_anchors(self, row: dict[str, Any], anchors: Sequence[int]) -> list[int]:
        """Anchors in click order, so pointwise prompts do not depend on how the list was ordered."""
        docs = row["docs"]
        return sorted(anchors, key=lambda d: (docs[d]["click_order"], docs[d]["doc_id"]))

    def anchor_text(self, row: dict[str, Any], level: int, anchors: Sequence[int]) -> str:
        if not (self.hparams.use_anchors and anchors):
            return ""
        blocks = [self.document_block(row["docs"][d], anchor=True) for d in self.ordered_anchors(row, anchors)]
        return ANCHOR_INTRO.format(level=level + 1) + "\n" + "\n".join(blocks)

    def stage_instruction(self, level: int) -> str:
        if level == self.levels[-1]:
            return TOP_INSTRUCTION
        return STAGE_INSTRUCTION.format(level=level, low=self.levels[0], high=self.levels[-1])

    def setwise_messages(self, row: dict[str, Any], request: StageRequest) -> list[dict[str, str]]:
        """The official code's chat: system, anchors (lower stages), intro, one turn per document, instruction."""
        messages = [{"role": "system", "content": SYSTEM}]
        anchors = self.anchor_text(row, request.level, request.anchors)
        if anchors:
            messages += [{"role": "user", "content": anchors}, {"role": "assistant", "content": "Understood."}]
        intro = SETWISE_INTRO.format(context=self.context_line(row), query=row["query"], count=len(request.candidates))
        messages += [{"role": "user", "content": intro}, {"role": "assistant", "content": ACK}]
        for j, d in enumerate(request.candidates, start=1):
            messages += [{"role": "user", "content": self.document_block(row["docs"][d], j)},
                         {"role": "assistant", "content": RECEIVED.format(j=j)}]
        messages.append({"role": "user", "content": self.stage_instruction(request.level) + " " + OUTPUT_FORMAT})
        return messages

    def render(self, messages: list[dict[str, str]]) -> str:
        return chat_messages(self.tokenizer, messages)

    def pointwise_prompt(self, row: dict[str, Any], level: int, d: int, anchors: Sequence[int]) -> str:
        question = (POINTWISE_TOP if level == self.levels[-1]
                    else POINTWISE_STAGE.format(level=level, low=self.levels[0], high=self.levels[-1]))
        anchor = self.anchor_text(row, level, anchors)
        user = (f"{self.context_line(row)}Query: {row['query']}\n" + (anchor + "\n" if anchor else "")
                + f"Document: {self.document_block(row['docs'][d])}\n{question}")
        return chat_prompt(self.tokenizer, user, system=SYSTEM)

    def single_prompt(self, row: dict[str, Any], d: int) -> str:
        user = (f"{self.context_line(row)}Query: {row['query']}\nDocument: {self.document_block(row['docs'][d])}\n"
                + SINGLE.format(low=self.levels[0], high=self.levels[-1]))
        return chat_prompt(self.tokenizer, user, system=SYSTEM)

    # -- LLM hooks -------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], *, greedy: bool = False, max_new_tokens: int | None = None) -> list[str]:
        """One reply per prompt (sampled at ``temperature``, seeded per call; or greedy)."""
        from zoo.blocks.rl.rollout import RolloutEngine

        engine = RolloutEngine(self.llm, self.tokenizer, max_new_tokens=max_new_tokens or self.hparams.max_new_tokens,
                               temperature=self.hparams.temperature, greedy=greedy)
        self._generate_calls += 1
        device = next(self.llm.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.hparams.seed * 1_000_003 + self._generate_calls)
        size = self.hparams.generate_batch_size
        texts: list[str] = []
        for start in range(0, len(prompts), size):
            texts += engine.generate(list(prompts[start:start + size]), generator=generator).texts
        return texts

    def stage_margins(self, prompts: Sequence[str]) -> torch.Tensor:
        """m = log P(yes) - log P(no) per prompt (cached)."""
        labels = self.hparams.yes_no_labels or ["Yes", "No"]
        logp = label_logprobs(self.llm, self.tokenizer, prompts, labels, batch_size=self.hparams.score_batch_size,
                              cache=self.cache)
        return logp[:, 0] - logp[:, 1]

    def stage_threshold(self, level: int) -> float:
        t = self.hparams.thresholds
        return float(t[self.levels.index(level) - 1]) if isinstance(t, (list, tuple)) else float(t)

    # -- stage classifiers -----------------------------------------------------------------------
    def decide(self, rows: Sequence[dict[str, Any]], level: int, requests: list[StageRequest]) -> list[StageAnswer]:
        """One stage for many queries (``request.query`` indexes ``rows``)."""
        kind = self.hparams.stage_classifier
        if kind == "oracle":
            answers = self.oracle_answers(rows, level, requests)
        elif kind == "pointwise_logit":
            answers = self.pointwise_answers(rows, level, requests)
        else:
            answers = self.setwise_answers(rows, level, requests)
        self.llm_calls += sum(a.calls for a in answers)
        return answers

    def oracle_answers(self, rows, level: int, requests: list[StageRequest]) -> list[StageAnswer]:
        voters = self.hparams.voters
        return [StageAnswer([voters * int(rows[r.query]["docs"][d]["usefulness"] >= level) for d in r.candidates])
                for r in requests]

    def pointwise_answers(self, rows, level: int, requests: list[StageRequest]) -> list[StageAnswer]:
        prompts = [self.pointwise_prompt(rows[r.query], level, d, r.anchors) for r in requests for d in r.candidates]
        margins = self.stage_margins(prompts).tolist() if prompts else []
        t, voters = self.stage_threshold(level), self.hparams.voters
        answers, i = [], 0
        for r in requests:
            votes = []
            for d in r.candidates:
                m = margins[i]
                i += 1
                if self.hparams.vote_sampling:
                    p = 1.0 / (1.0 + math.exp(-(m - t)))
                    doc_id = rows[r.query]["docs"][d]["doc_id"]
                    votes.append(sum(seeded_uniform(self.hparams.seed, rows[r.query]["qid"], doc_id, level, v) < p
                                     for v in range(voters)))
                else:
                    votes.append(voters * int(m > t))
            answers.append(StageAnswer(votes, calls=len(r.candidates)))
        return answers

    def setwise_answers(self, rows, level: int, requests: list[StageRequest]) -> list[StageAnswer]:
        voters = self.hparams.voters
        chats = [self.setwise_messages(rows[r.query], r) for r in requests]
        owners = [i for i in range(len(requests)) for _ in range(voters)]
        replies = self.generate([self.render(chats[i]) for i in owners])
        parsed = [parse_bracket_ids(reply, len(requests[i].candidates)) for reply, i in zip(replies, owners)]
        calls = [voters] * len(requests)
        broken = [n for n, ids in enumerate(parsed) if ids is None]
        if broken and self.hparams.repair:
            repair_prompts = [self.render(chats[owners[n]] + [{"role": "assistant", "content": replies[n]},
                                                              {"role": "user", "content": REPAIR}]) for n in broken]
            fixed = self.generate(repair_prompts, greedy=True, max_new_tokens=self.hparams.repair_max_new_tokens)
            for n, reply in zip(broken, fixed):
                parsed[n] = parse_bracket_ids(reply, len(requests[owners[n]].candidates))
                replies[n] += "\n[repair] " + reply
                calls[owners[n]] += 1
        answers = []
        for i, r in enumerate(requests):
            votes = [0] * len(r.candidates)
            for n in range(i * voters, (i + 1) * voters):
                for j in parsed[n] or []:       # still unparsable after repair: selects nothing
                    votes[j - 1] += 1
            answers.append(StageAnswer(votes, replies[i * voters:(i + 1) * voters], calls[i]))
        return answers

    # -- labelling -------------------------------------------------------------------------------
    def label(self, rows: Sequence[dict[str, Any]]) -> dict[str, list]:
        """Per query: ``labels`` (per document, the query's order), ``votes`` (per document, level ->
        votes at the stages it reached), ``replies`` (per stage) and ``calls``."""
        rows = list(rows)
        if self.hparams.method == "single_prompt":
            return self.single_prompt_labels(rows)
        result = run_cascade([len(r["docs"]) for r in rows], self.levels,
                             lambda level, requests: self.decide(rows, level, requests), self.threshold)
        votes = [[{} for _ in r["docs"]] for r in rows]
        replies = [{} for _ in rows]
        for q, (stages, answers) in enumerate(zip(result.stages, result.answers)):
            for request, answer in zip(stages, answers):
                for d, v in zip(request.candidates, answer.votes):
                    votes[q][d][str(request.level)] = v
                replies[q][str(request.level)] = answer.replies
        return {"labels": result.labels, "votes": votes, "replies": replies, "calls": result.calls,
                "stages": result.stages}

    def single_prompt_labels(self, rows: list[dict[str, Any]]) -> dict[str, list]:
        """The baseline: one prompt per document asking for its level directly."""
        kind, low = self.hparams.stage_classifier, self.levels[0]
        pairs = [(q, d) for q, r in enumerate(rows) for d in range(len(r["docs"]))]
        labels = [[low] * len(r["docs"]) for r in rows]
        replies: list[dict[str, list]] = [{} for _ in rows]
        calls = [0] * len(rows)
        if kind == "oracle":
            for q, d in pairs:
                labels[q][d] = rows[q]["docs"][d]["usefulness"]
        elif kind == "pointwise_logit":
            prompts = [self.single_prompt(rows[q], d) for q, d in pairs]
            logp = (label_logprobs(self.llm, self.tokenizer, prompts, [str(v) for v in self.levels],
                                   batch_size=self.hparams.score_batch_size, cache=self.cache) if prompts else None)
            for n, (q, d) in enumerate(pairs):
                labels[q][d] = self.levels[int(logp[n].argmax())]
                calls[q] += 1
        else:
            voters = self.hparams.voters
            texts = self.generate([self.single_prompt(rows[q], d) for q, d in pairs for _ in range(voters)])
            for n, (q, d) in enumerate(pairs):
                mine = texts[n * voters:(n + 1) * voters]
                found = [v for v in (parse_level(t, self.levels) for t in mine) if v is not None]
                labels[q][d] = statistics.median_low(found) if found else low
                replies[q][str(d)] = mine
                calls[q] += voters
        self.llm_calls += sum(calls)
        return {"labels": labels, "votes": [[{} for _ in r["docs"]] for r in rows], "replies": replies,
                "calls": calls, "stages": [[] for _ in rows]}

    # -- evaluation ------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._results = []

    @torch.no_grad()
    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        out = self.label(batch)
        for row, labels, calls in zip(batch, out["labels"], out["calls"]):
            self._results.append({"pred": labels, "gold": [d["usefulness"] for d in row["docs"]], "calls": calls})

    def on_test_epoch_end(self) -> None:
        results = self._results
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        if not results:
            return
        pred = [p for r in results for p in r["pred"]]
        gold = [g for r in results for g in r["gold"]]
        metrics = agreement(pred, gold, self.levels)
        metrics["llm_calls_per_query"] = sum(r["calls"] for r in results) / len(results)
        self.test_metrics = {f"test/{k}": float(v) for k, v in metrics.items()}
        for key, value in self.test_metrics.items():
            self.log(key, value, prog_bar=key == "test/weighted_kappa", rank_zero_only=True)

    @torch.no_grad()
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        out = self.label(batch)
        return [{"qid": row["qid"], "doc_ids": [d["doc_id"] for d in row["docs"]], "labels": out["labels"][q],
                 "votes": out["votes"][q], "replies": out["replies"][q], "calls": out["calls"][q]}
                for q, row in enumerate(batch)]
