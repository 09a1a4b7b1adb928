"""Agentic-R's training data: passage utility for each search of an agent's trajectories.

Pipeline (the reference code's step1-step4):

1. run the agent on the training questions (trajectories with at least one search);
2. retrieve the top ``candidates`` (20) passages for every search query with the current retriever;
3. ask a ``Judge`` for the sub-answer each query was after, then for the local relevance (LR) of every
   candidate, 0-100 in batches of ``lr_batch_size`` (10); a batch it fails to score drops the round;
4. global answer correctness (GAC): splice each candidate in as that search's only result and let the
   agent continue greedily (``agents.replay``); GAC = EM of the final answer. Rounds from ``max_round``
   + 1 on (5: no search budget left) are not labelled;
5. ``select_groups``: rank candidates by (GAC, LR), keep rounds whose best has GAC = 1 and LR >= 0.6,
   and emit one group [positive] + sampled negatives per tied-best candidate (at most 3).

Groups are written as JSONL rows ``{dataset, query_id, question, round_index, history_queries,
query_text, passage_ids, scores}`` (``scores``: LR x 100 of each passage, the positive first).
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from zoo.agentic_r.agents import (
    SearchAgent,
    SearchTool,
    Trajectory,
    replay,
    run_episode,
)
from zoo.blocks.qa import exact_match, normalize_answer
from zoo.blocks.search_env import Passage

NOT_SURE = "Not Sure"
SELECTIONS = ("lexicographic", "weighted", "relevance")


# -- selection ------------------------------------------------------------------------------------
def select_groups(gac: Sequence[float], lr: Sequence[float], *, selection: str = "lexicographic",
                  weight: float = 1.0, lr_threshold: float = 0.6, max_positives: int = 3, negatives: int = 15,
                  rng: random.Random | None = None) -> list[list[int]]:
    """Training groups of one search round, as candidate indices ``[positive, negative, ...]``.

    ``lexicographic`` (the reference code): utility is (GAC, LR) compared in that order; the
    round is kept when its best candidate has GAC = 1 and LR >= ``lr_threshold``, and at least
    ``negatives`` candidates are worse than the best. ``weighted``: utility GAC + ``weight`` x LR
    (an ablation). ``relevance``: LR alone, GAC unused (the "without GAC" ablation). Positives are
    the candidates tied with the best, in rank order, at most ``max_positives``; each gets its own
    ``negatives`` sampled uniformly without replacement from the rest, kept in rank order.
    """
    if len(gac) != len(lr):
        raise ValueError(f"{len(gac)} GAC values for {len(lr)} LR values")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection '{selection}'; choose one of {SELECTIONS}")
    if selection == "lexicographic":
        utility = [(g, r) for g, r in zip(gac, lr)]
    elif selection == "weighted":
        utility = [(g + weight * r,) for g, r in zip(gac, lr)]
    else:
        utility = [(r,) for r in lr]
    order = sorted(range(len(lr)), key=lambda i: utility[i], reverse=True)    # stable: ties keep rank order
    if not order:
        return []
    best = order[0]
    if lr[best] < lr_threshold or (selection != "relevance" and gac[best] < 1):
        return []
    positives = [i for i in order if utility[i] == utility[best]]
    rest = [i for i in order if utility[i] != utility[best]]
    if len(rest) < negatives:
        return []
    rng = rng or random.Random(0)
    groups = []
    for positive in positives[:max_positives]:
        picked = sorted(rng.sample(range(len(rest)), negatives))
        groups.append([positive] + [rest[j] for j in picked])
    return groups


# -- judges ---------------------------------------------------------------------------------------
class Judge(Protocol):
    """Sub-answers per search query, and 0-100 relevance scores per passage (None: unparseable)."""

    def sub_answers(self, sample: Mapping[str, Any], trajectory: Trajectory) -> list[str] | None: ...

    def relevance(self, query: str, passages: Sequence[str], reference: str | None) -> list[float] | None: ...


_STOPWORDS = frozenset(["a", "an", "the", "of", "in", "is", "was", "to", "for", "by", "on", "at", "and", "or"])


def _content_words(text: str) -> set[str]:
    return set(normalize_answer(text).split()) - _STOPWORDS


class HeuristicJudge:
    """The stand-in for the 72B judge on the synthetic world.

    Sub-answers come from the gold chain (``subquestions``): the i-th query's sub-answer is the
    i-th hop's answer, "Not Sure" past the chain. LR = 100 x the F1 overlap of the passage's
    content words with those of "query + sub-answer" (the query alone when the sub-answer is "Not
    Sure" or ``use_sub_answers`` is off: pure query-passage similarity).
    """

    def __init__(self, use_sub_answers: bool = True) -> None:
        self.use_sub_answers = use_sub_answers

    def sub_answers(self, sample: Mapping[str, Any], trajectory: Trajectory) -> list[str]:
        chain = [answer for _, answer in sample.get("subquestions") or []]
        if not chain:
            chain = [NOT_SURE] * (len(trajectory.steps) - 1) + [sample["golden_answers"][0]]
        return [chain[i] if i < len(chain) else NOT_SURE for i in range(len(trajectory.steps))]

    def relevance(self, query: str, passages: Sequence[str], reference: str | None) -> list[float]:
        target = _content_words(query + (" " + reference if reference and self.use_sub_answers else ""))
        scores = []
        for passage in passages:
            words = _content_words(passage)
            common = len(words & target)
            scores.append(0.0 if not common else 100.0 * 2 * common / (len(words) + len(target)))
        return scores


SUB_ANSWER_PROMPT = """You are given a question, its gold answers and a search agent's reasoning trajectory with its search queries.
For every search query, in order, write the short fact that query was meant to find, consistent with the gold answers, inside <sub-answer> and </sub-answer>. Write <sub-answer> Not Sure </sub-answer> when you cannot tell.

Question: {question}
Gold answers: {answers}
Trajectory:
{trajectory}

Write exactly {n} sub-answers, one per query."""

RELEVANCE_PROMPT = """Rate how well each passage answers the search query, with an integer from 0 to 100:
81-100: directly and fully answers the query; 61-80: answers most of it; 41-60: partially relevant or on topic; 21-40: shares keywords only; 0-20: irrelevant.

Query: {query}
{reference}{passages}

Output only the {n} scores, in passage order, separated by spaces."""


def parse_sub_answers(text: str, count: int) -> list[str] | None:
    """The <sub-answer> contents, or None unless there is exactly one per query."""
    found = [s.strip() for s in re.findall(r"<sub-answer>(.*?)</sub-answer>", text, flags=re.DOTALL)]
    return found if len(found) == count else None


def parse_scores(text: str, count: int) -> list[float] | None:
    """``count`` integer scores clamped to [0, 100], or None when the output holds another number of them."""
    found = [int(x) for x in re.findall(r"-?\d+", text)]
    if len(found) != count:
        return None
    return [float(min(max(x, 0), 100)) for x in found]


def relevance_prompt(query: str, passages: Sequence[str], reference: str | None) -> str:
    """The listwise LR prompt; a reference answer appears only when it is known (not "Not Sure")."""
    shown = f"Reference answer: {reference}\n" if reference and reference.strip() != NOT_SURE else ""
    listed = "\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages))
    return RELEVANCE_PROMPT.format(query=query, reference=shown, passages=listed, n=len(passages))


def trajectory_text(trajectory: Trajectory) -> str:
    lines = []
    for i, step in enumerate(trajectory.steps, 1):
        lines.append(f"{step.text or f'<search> {step.query} </search>'}")
        lines.append("<information> " + " ".join(f"Doc {j + 1}: {p.contents()}"
                                                for j, p in enumerate(step.passages)) + " </information>")
    lines.append(trajectory.text or f"<answer> {trajectory.answer} </answer>")
    return "\n".join(lines)


class LLMJudge:
    """A judge over any causal LM (Qwen2.5-72B-Instruct in the paper; SmolLM2 fits on a CPU), greedy."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 1000, chat_template: bool = True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.chat_template = chat_template and getattr(tokenizer, "chat_template", None) is not None

    @classmethod
    def from_backbone(cls, name: str, **kwargs: Any) -> LLMJudge:
        from zoo.backbones import build_backbone
        model, tokenizer = build_backbone(name, causal_lm=True, padding_side="left")
        return cls(model.eval(), tokenizer, **kwargs)

    def generate(self, prompt: str) -> str:
        import torch

        if self.chat_template:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not self.chat_template)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model.generate(**{k: v.to(device) for k, v in inputs.items()}, do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def sub_answers(self, sample: Mapping[str, Any], trajectory: Trajectory) -> list[str] | None:
        prompt = SUB_ANSWER_PROMPT.format(question=sample["question"], answers=", ".join(sample["golden_answers"]),
                                          trajectory=trajectory_text(trajectory), n=len(trajectory.steps))
        return parse_sub_answers(self.generate(prompt), len(trajectory.steps))

    def relevance(self, query: str, passages: Sequence[str], reference: str | None) -> list[float] | None:
        return parse_scores(self.generate(relevance_prompt(query, passages, reference)), len(passages))


# -- the labeller ---------------------------------------------------------------------------------
@dataclass
class RoundLabels:
    """One search round's candidates with their LR (0-1) and GAC (0/1; None when not computed)."""

    sample: Mapping[str, Any]
    round_index: int
    query: str
    history: list[str]
    candidates: list[Passage]
    lr: list[float]
    gac: list[float] | None


class UtilityLabeler:
    """Trajectories -> candidates -> LR and GAC -> selected groups. See the module docstring."""

    def __init__(self, agent: SearchAgent, tool: SearchTool, judge: Judge, *, candidates: int = 20,
                 lr_batch_size: int = 10, lr_threshold: float = 0.6, max_positives: int = 3, negatives: int = 15,
                 max_round: int = 4, selection: str = "lexicographic", weight: float = 1.0, seed: int = 0) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection '{selection}'; choose one of {SELECTIONS}")
        self.agent, self.tool, self.judge = agent, tool, judge
        self.candidates, self.lr_batch_size = candidates, lr_batch_size
        self.lr_threshold, self.max_positives, self.negatives = lr_threshold, max_positives, negatives
        self.max_round, self.selection, self.weight = max_round, selection, weight
        self.seed = seed

    def trajectories(self, samples: Iterable[Mapping[str, Any]]) -> list[Trajectory]:
        return [t for t in (run_episode(self.agent, s, self.tool) for s in samples) if t.steps]

    def gac(self, trajectory: Trajectory, round_index: int, passage: Passage) -> float:
        """EM of the agent's final answer when ``passage`` alone answers search ``round_index``."""
        continued = replay(self.agent, trajectory, round_index, [passage], self.tool)
        return exact_match(continued.answer, trajectory.sample["golden_answers"])

    def label_rounds(self, trajectory: Trajectory) -> list[RoundLabels]:
        sample = trajectory.sample
        sub_answers = self.judge.sub_answers(sample, trajectory)
        if sub_answers is None or len(sub_answers) != len(trajectory.steps):
            return []
        rounds = []
        for i, (step, sub_answer) in enumerate(zip(trajectory.steps, sub_answers), 1):
            if i > self.max_round:
                break
            history = [s.query for s in trajectory.steps[:i - 1]]
            candidates = self.tool.search(sample["question"], step.query, history, k=self.candidates)
            if len(candidates) != self.candidates:
                continue
            reference = None if sub_answer.strip() == NOT_SURE else sub_answer
            lr: list[float] = []
            for start in range(0, len(candidates), self.lr_batch_size):
                batch = [p.contents() for p in candidates[start:start + self.lr_batch_size]]
                scores = self.judge.relevance(step.query, batch, reference)
                if scores is None or len(scores) != len(batch):
                    break
                lr += [s / 100.0 for s in scores]
            if len(lr) != len(candidates):
                continue
            gac = None if self.selection == "relevance" else [self.gac(trajectory, i, p) for p in candidates]
            rounds.append(RoundLabels(sample, i, step.query, history, candidates, lr, gac))
        return rounds

    def groups_of(self, labels: RoundLabels, rng: random.Random) -> list[dict[str, Any]]:
        gac = labels.gac if labels.gac is not None else [0.0] * len(labels.lr)
        picked = select_groups(gac, labels.lr, selection=self.selection, weight=self.weight,
                               lr_threshold=self.lr_threshold, max_positives=self.max_positives,
                               negatives=self.negatives, rng=rng)
        sample = labels.sample
        return [{"dataset": sample.get("source", ""), "query_id": f"{sample['qid']}-{labels.round_index}",
                 "question": sample["question"], "round_index": labels.round_index,
                 "history_queries": labels.history, "query_text": labels.query,
                 "passage_ids": [labels.candidates[j].id for j in group],
                 "scores": [100.0 * labels.lr[j] for j in group]} for group in picked]

    def __call__(self, samples: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        rng = random.Random(self.seed)
        groups = []
        for trajectory in self.trajectories(samples):
            for labels in self.label_rounds(trajectory):
                groups += self.groups_of(labels, rng)
        return groups


def write_groups(groups: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for group in groups:
            f.write(json.dumps(group) + "\n")
    return path
