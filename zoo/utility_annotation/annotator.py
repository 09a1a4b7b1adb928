"""The annotation pipeline: relevance selection -> pseudo answer -> utility selection / ranking.

Four prompts (the authors' RankGPT-style chats: one ``[i] passage`` user turn and one ``Received passage
[i].`` assistant turn per passage, the instruction last), tolerant parsers, and a runner that writes one
JSON line per query and resumes where an earlier run stopped. Any backend with
``generate(requests) -> texts`` annotates: ``CausalLMBackend`` (any causal LM through its chat template,
batched with the zoo's ``RolloutEngine``) or ``MockBackend`` (deterministic keyword rules for tests and
the embedded default; its answers are written in the LLM output formats, so the parsers run too).
"""
from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from zoo.blocks.llm import chat_messages

STEPS = ("relevance", "pseudo_answer", "utility_selection", "utility_ranking")
PASSAGE_WORDS = 300

RELEVANCE_INTRO = ("You are the relevance judger, an intelligent assistant that can judge whether a passage is "
                   "relevant to the question. I will provide you with {n} passages, each indicated by a number "
                   "identifier []. Judge which passages are relevant to the question: {query}.")
RELEVANCE_FINAL = ("Question: {query}\n\nThe {n} passages above are each indicated by a number identifier []. "
                   "Select the passages that are relevant to the question. Output only the identifiers of the "
                   "relevant passages in the format: My selection:[[i],[j],...]. Only respond with the selection, "
                   "do not say any word or explain.")
UTILITY_INTRO = ("You are the utility judger, an intelligent assistant that can select the passages that have "
                 "utility for answering the question. I will provide you with {n} passages, each indicated by a "
                 "number identifier [], together with the question and a reference answer.")
UTILITY_FINAL = ("Question: {query}\nReference answer: {answer}\n\nThe {n} passages above are each indicated by a "
                 "number identifier []. Select the passages that are not only relevant to the question but also "
                 "useful for generating a correct, reasonable and perfect answer to it. Output only the "
                 "identifiers in the format: My selection:[[i],[j],...]. Only respond with the selection, do not "
                 "say any word or explain.")
RANKING_INTRO = ("You are RankGPT, an intelligent assistant that can rank passages by their utility for "
                 "answering the question. I will provide you with {n} passages, each indicated by a number "
                 "identifier [], together with the question and a reference answer.")
RANKING_FINAL = ("Question: {query}\nReference answer: {answer}\n\nRank the {n} passages above by their utility "
                 "for generating a correct, reasonable and perfect answer to the question, most useful first. "
                 "Output the ranking as identifiers in the format [i] > [j] > ... . Only respond with the "
                 "ranking, do not say any word or explain.")
ANSWER_PROMPT = ("You are a faithful question and answer assistant. Answer the question in one or a few "
                 "sentences using the given passages.\n\n{passages}\n\nQuestion: {query}\nAnswer:")
ACKNOWLEDGE = "Okay, please provide the passages."


# -- prompts ---------------------------------------------------------------------------------
def truncate_words(text: str, words: int = PASSAGE_WORDS) -> str:
    return " ".join(text.split()[:words])


def _passage_chat(intro: str, final: str, passages: Sequence[str], words: int) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": intro}, {"role": "assistant", "content": ACKNOWLEDGE}]
    for i, passage in enumerate(passages, start=1):
        messages.append({"role": "user", "content": f"[{i}] {truncate_words(passage, words)}"})
        messages.append({"role": "assistant", "content": f"Received passage [{i}]."})
    messages.append({"role": "user", "content": final})
    return messages


def relevance_messages(query: str, passages: Sequence[str], words: int = PASSAGE_WORDS) -> list[dict[str, str]]:
    n = len(passages)
    return _passage_chat(RELEVANCE_INTRO.format(n=n, query=query), RELEVANCE_FINAL.format(n=n, query=query),
                         passages, words)


def pseudo_answer_messages(query: str, passages: Sequence[str], words: int = PASSAGE_WORDS) -> list[dict[str, str]]:
    shown = "\n".join(f"[{i}] {truncate_words(p, words)}" for i, p in enumerate(passages, start=1))
    return [{"role": "user", "content": ANSWER_PROMPT.format(passages=shown, query=query)}]


def utility_selection_messages(query: str, passages: Sequence[str], answer: str,
                               words: int = PASSAGE_WORDS) -> list[dict[str, str]]:
    n = len(passages)
    return _passage_chat(UTILITY_INTRO.format(n=n), UTILITY_FINAL.format(n=n, query=query, answer=answer),
                         passages, words)


def utility_ranking_messages(query: str, passages: Sequence[str], answer: str,
                             words: int = PASSAGE_WORDS) -> list[dict[str, str]]:
    n = len(passages)
    return _passage_chat(RANKING_INTRO.format(n=n), RANKING_FINAL.format(n=n, query=query, answer=answer),
                         passages, words)


# -- parsers ---------------------------------------------------------------------------------
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ID = re.compile(r"\[\s*(\d+)\s*\]")


def strip_thinking(text: str) -> str:
    """The answer after any reasoning block (an unclosed ``<think>`` leaves nothing to parse)."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        return ""
    return _THINK.sub("", text)


def parse_selection(text: str, n: int) -> list[int]:
    """Passage ids (1-based, sorted, unique, within [1, n]) of a ``My selection:[[i],[j]]`` answer.

    Tolerates spaces, missing inner brackets (``[1], [3]``), bare numbers after the marker, duplicates
    and out-of-range ids; empty or garbled text gives an empty list."""
    answer = strip_thinking(text)
    marker = re.search(r"selection\s*:?", answer, re.IGNORECASE)
    if marker:
        answer = answer[marker.end():]
    ids = [int(m) for m in _ID.findall(answer)]
    if not ids and marker:
        ids = [int(m) for m in re.findall(r"\d+", answer.split("\n", 1)[0])]
    return sorted({i for i in ids if 1 <= i <= n})


def parse_ranking(text: str, n: int) -> list[int]:
    """A permutation of 1..n from ``[i] > [j] > ...``: first mentions kept, out-of-range ids dropped,
    missing ids appended in their original order."""
    seen: list[int] = []
    for match in _ID.findall(strip_thinking(text)):
        i = int(match)
        if 1 <= i <= n and i not in seen:
            seen.append(i)
    return seen + [i for i in range(1, n + 1) if i not in seen]


def ranking_was_parsed(text: str, n: int) -> bool:
    return any(1 <= int(m) <= n for m in _ID.findall(strip_thinking(text)))


# -- backends --------------------------------------------------------------------------------
@dataclass
class Request:
    """One LLM call: the chat ``messages`` for a real model, the parts for rule-based mocks."""

    step: str
    messages: list[dict[str, str]]
    query: str
    passages: list[str]
    answer: str = ""
    key: str = ""


class Backend(Protocol):
    name: str

    def generate(self, requests: Sequence[Request]) -> list[str]: ...


class CausalLMBackend:
    """Any causal LM of the zoo's backbones (``smollm2-135m``, a tiny preset, a local folder), sampled
    with the repo's decoding (temperature 0.6, top-p 0.95, top-k 20) or greedily."""

    def __init__(self, backbone: str = "smollm2-135m", max_new_tokens: int = 128, answer_tokens: int = 96,
                 temperature: float = 0.6, top_p: float = 0.95, top_k: int = 20, greedy: bool = False,
                 batch_size: int = 4, seed: int = 0, device: str = "cpu") -> None:
        import torch

        from zoo.backbones import build_backbone
        from zoo.blocks.rl.rollout import RolloutEngine

        self.name = backbone
        model, self.tokenizer = build_backbone(backbone, causal_lm=True, padding_side="left")
        self.model = model.to(device).eval()
        self.engine = RolloutEngine(self.model, self.tokenizer, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
        self.answer_tokens = answer_tokens
        self.batch_size = batch_size
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def generate(self, requests: Sequence[Request]) -> list[str]:
        texts: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            prompts = [chat_messages(self.tokenizer, r.messages) for r in chunk]
            budgets = [self.answer_tokens if r.step == "pseudo_answer" else self.engine.max_new_tokens for r in chunk]
            texts += list(self.engine.generate(prompts, max_new_tokens=budgets, generator=self.generator).texts)
        return texts


_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


@dataclass
class MockBackend:
    """Deterministic stand-in for the annotator LLM (the spec's embedded default).

    relevance: passages sharing at least ``min_overlap`` words with the query; pseudo answer: the
    ``answer_words`` first non-query words of the most overlapping passage shown; utility: passages
    containing at least ``min_answer_words`` of those words; ranking: by (answer words, query overlap).
    ``noise_rate`` adds, per utility call and with that probability, one unselected passage (a false
    positive), seeded by ``seed`` and the query."""

    min_overlap: int = 2
    answer_words: int = 5
    min_answer_words: int = 2
    noise_rate: float = 0.0
    seed: int = 0
    name: str = field(default="mock", init=False)

    def _overlap(self, query: str, passage: str) -> int:
        return len(_words(query) & _words(passage))

    def _answer_hits(self, answer: str, passage: str) -> int:
        return len(_words(answer) & _words(passage))

    def answer(self, request: Request) -> str:
        q = request.query
        if request.step == "relevance":
            ids = [i for i, p in enumerate(request.passages, 1) if self._overlap(q, p) >= self.min_overlap]
            return "My selection:" + "[" + ",".join(f"[{i}]" for i in ids) + "]."
        if request.step == "pseudo_answer":
            if not request.passages:
                return ""
            best = max(request.passages, key=lambda p: self._overlap(q, p))
            query_words = _words(q)
            return " ".join([w for w in _WORD.findall(best.lower()) if w not in query_words][: self.answer_words])
        hits = [self._answer_hits(request.answer, p) for p in request.passages]
        if request.step == "utility_selection":
            ids = [i for i, h in enumerate(hits, 1) if h >= self.min_answer_words]
            rng = random.Random(f"{self.seed}:{q}")
            unselected = [i for i in range(1, len(hits) + 1) if i not in ids]
            if unselected and rng.random() < self.noise_rate:
                ids = sorted(ids + [rng.choice(unselected)])
            return "My selection:[" + ",".join(f"[{i}]" for i in ids) + "]."
        order = sorted(range(1, len(hits) + 1),
                       key=lambda i: (-hits[i - 1], -self._overlap(q, request.passages[i - 1]), i))
        return " > ".join(f"[{i}]" for i in order)

    def generate(self, requests: Sequence[Request]) -> list[str]:
        return [self.answer(r) for r in requests]


# -- the pipeline ----------------------------------------------------------------------------
@dataclass
class Candidates:
    """A query and its candidate pool (shuffled before prompting, against position bias)."""

    query_id: str
    query: str
    doc_ids: list[str]
    texts: list[str]


class UtilityAnnotator:
    """Runs the steps over batches of queries and writes one JSON line per query:
    ``{query_id, candidate_ids, relevance_ids, pseudo_answer, utility_ids, utility_ranking, model,
    parse_failures, seconds}`` (ids are document ids). ``pseudo_answer_from``: ``relevance`` (the
    relevance-selected passages, all candidates when none was selected) or ``candidates``."""

    def __init__(self, backend: Backend, passage_words: int = PASSAGE_WORDS, ranking: bool = True,
                 pseudo_answer_from: str = "relevance", batch_size: int = 8) -> None:
        if pseudo_answer_from not in ("relevance", "candidates"):
            raise ValueError(f"unknown pseudo_answer_from '{pseudo_answer_from}'; choose relevance or candidates")
        self.backend = backend
        self.passage_words = passage_words
        self.ranking = ranking
        self.pseudo_answer_from = pseudo_answer_from
        self.batch_size = batch_size

    def _ask(self, requests: list[Request]) -> list[str]:
        return self.backend.generate(requests) if requests else []

    def annotate_batch(self, items: Sequence[Candidates]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        w = self.passage_words
        failures: list[list[str]] = [[] for _ in items]
        answers = self._ask([Request("relevance", relevance_messages(c.query, c.texts, w), c.query,
                                     [truncate_words(t, w) for t in c.texts]) for c in items])
        relevant: list[list[int]] = []
        for k, (c, text) in enumerate(zip(items, answers)):
            ids = parse_selection(text, len(c.texts))
            if not ids:
                failures[k].append("relevance")
            relevant.append(ids)
        shown = [[c.texts[i - 1] for i in ids] if ids and self.pseudo_answer_from == "relevance" else list(c.texts)
                 for c, ids in zip(items, relevant)]
        pseudo = [a.strip() for a in self._ask(
            [Request("pseudo_answer", pseudo_answer_messages(c.query, texts, w), c.query,
                     [truncate_words(t, w) for t in texts]) for c, texts in zip(items, shown)])]
        judged = [k for k, ids in enumerate(relevant) if ids]
        utility: dict[int, list[int]] = {}
        selections = self._ask([Request("utility_selection", utility_selection_messages(
            items[k].query, [items[k].texts[i - 1] for i in relevant[k]], pseudo[k], w), items[k].query,
            [truncate_words(items[k].texts[i - 1], w) for i in relevant[k]], pseudo[k]) for k in judged])
        for k, text in zip(judged, selections):
            local = parse_selection(text, len(relevant[k]))
            if not local:
                failures[k].append("utility_selection")
            utility[k] = [relevant[k][i - 1] for i in local]
        rankings: dict[int, list[int]] = {}
        if self.ranking:
            texts = self._ask([Request("utility_ranking", utility_ranking_messages(
                items[k].query, [items[k].texts[i - 1] for i in relevant[k]], pseudo[k], w), items[k].query,
                [truncate_words(items[k].texts[i - 1], w) for i in relevant[k]], pseudo[k]) for k in judged])
            for k, text in zip(judged, texts):
                if not ranking_was_parsed(text, len(relevant[k])):
                    failures[k].append("utility_ranking")
                rankings[k] = [relevant[k][i - 1] for i in parse_ranking(text, len(relevant[k]))]
        seconds = (time.perf_counter() - start) / max(len(items), 1)
        return [{
            "query_id": c.query_id,
            "candidate_ids": c.doc_ids,
            "relevance_ids": [c.doc_ids[i - 1] for i in relevant[k]],
            "pseudo_answer": pseudo[k],
            "utility_ids": [c.doc_ids[i - 1] for i in utility.get(k, [])],
            "utility_ranking": [c.doc_ids[i - 1] for i in rankings.get(k, [])],
            "model": self.backend.name,
            "parse_failures": failures[k],
            "seconds": round(seconds, 3),
        } for k, c in enumerate(items)]

    def run(self, items: Sequence[Candidates], output: str | Path | None = None) -> list[dict[str, Any]]:
        """Annotate ``items``; with ``output`` (JSONL), queries already in it are skipped and new lines are
        appended batch by batch, so a killed run resumes where it stopped. Returns every record of
        ``items`` (read back and new)."""
        done: dict[str, dict[str, Any]] = {}
        if output is not None:
            output = Path(output)
            if output.exists():
                done = read_annotations(output, drop_partial_tail=True)
                # A run killed mid-line leaves a partial last line: rewrite the file without it.
                if not output.read_text().endswith("\n") and output.stat().st_size:
                    output.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
            output.parent.mkdir(parents=True, exist_ok=True)
        todo = [c for c in items if c.query_id not in done]
        for start in range(0, len(todo), self.batch_size):
            records = self.annotate_batch(todo[start:start + self.batch_size])
            for record in records:
                done[record["query_id"]] = record
            if output is not None:
                with output.open("a") as handle:
                    handle.writelines(json.dumps(r) + "\n" for r in records)
        return [done[c.query_id] for c in items]


def read_annotations(path: str | Path, drop_partial_tail: bool = False) -> dict[str, dict[str, Any]]:
    """query_id -> record of an annotation JSONL file (a later line for the same query wins).
    ``drop_partial_tail`` skips an unparsable last line without a newline (a killed writer's)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    records: dict[str, dict[str, Any]] = {}
    lines = path.read_text().splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if drop_partial_tail and number == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
        missing = [k for k in ("query_id", "candidate_ids", "relevance_ids", "utility_ids") if k not in record]
        if missing:
            raise ValueError(f"{path}:{number}: annotation record lacks {missing}")
        records[str(record["query_id"])] = record
    return records
