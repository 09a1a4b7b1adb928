"""JADE (Chen et al., arXiv 2601.21916): one LLM plays a workflow Planner and seven Executors in multi-turn
agentic RAG; every role's calls go into one buffer and PPO (separate critic, GAE) trains the shared weights
on one outcome reward.

The episode is the released code's two-level loop, generalised by ``max_depth``::

    Planner(Q) -> workflow W                          (invalid: penalty, then "QDS")
    W = QDS:  QDS(Q) -> q1..qm; for each: QR(Q, solved so far, qi) -> qi'; solve(qi') ; AS(Q, pairs)
    W = QDP:  QDP(Q) -> q1..qm; for each: solve(qi)                                    ; AS(Q, pairs)
    W = [QR,][R,][DS,]AG:  QR rewrites the query, R retrieves k docs (no transition), DS keeps some, AG answers

A node below ``max_depth`` is planned by the Planner (it may decompose again); at ``max_depth`` the
Sub-Planner picks from {R, DS, AG} (invalid: penalty, then "R,AG"; ``fixed_subworkflow`` overrides its
choice, as the released code does, while its transition is still trained). Rounds follow the code:
a chain is one round, QDS 1 + the rounds of its sub-questions, QDP 1 + the most any sub-question took;
``max_rounds`` leaves the remaining sub-questions unanswered.

Reward (per question): R_global = answer_score(final, gold) - alpha * c_rnd - beta * c_ret, with
c_ret = min(N_ret, 3) / 3 and c_rnd = min(T - 1, 3) / 3 (``round_cost: code``) or min(T, 3) / 3
(``paper``); answer_score is EM for a yes/no gold answer and token F1 otherwise. Step (t, k) gets
its format penalty, plus R_global on every step (``broadcast``, the code) or on the last one only
(``terminal``, the paper). Terminal mode's GAE over the question's flattened transitions equals, for
gamma = lambda = 1, per-transition GAE on each step's return-to-go, which is what gets trained.

Each role is an entry of ``ROLES``: its system prompt (the paper's Appendix E pattern), a compact
tag for small word-level models, an observation builder and a strict parser returning
``(parsed, is_valid)``; ``candidates`` lists each role's outputs for choice decoding.
"""
from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zoo.blocks.qa import answer_score, normalize_answer
from zoo.blocks.search_env import Passage, SearchEnvironment, TrajectoryStats
from zoo.blocks.world import RELATIONS
from zoo.policy_gradient.agents import AgentPPOModule, Call, Episode, Transition

MODULES = ("QR", "QDP", "QDS", "R", "DS", "AG")
CHAIN_ORDER = ("QR", "R", "DS", "AG")
DECOMPOSERS = ("QDS", "QDP")
SUB_MODULES = ("R", "DS", "AG")
REWARD_ASSIGNMENTS = ("broadcast", "terminal")
ROUND_COSTS = ("code", "paper")
PROMPT_STYLES = ("compact", "full")

_WORKFLOW = re.compile(r"\s*<workflow>(.*?)</workflow>\s*", re.DOTALL)
_QUERY = re.compile(r"<query>(.*?)</query>", re.DOTALL)
_SUBQUESTION = re.compile(r"<q(\d+)>(.*?)</q\1>", re.DOTALL)
_IDS = re.compile(r"\s*<id>(.*?)</id>\s*", re.DOTALL)
_DOC_ID = re.compile(r"Document\s*(\d+)")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_WORD = re.compile(r"\w+")
# Named things of the generated world (Entity17, City4, ...): the slots choice decoding fills.
_ENTITY = re.compile(r"\b[A-Z][A-Za-z]*\d+\b")


# -- workflow validity and the role parsers ------------------------------------------------------
def split_modules(workflow: str) -> list[str]:
    return [m.strip() for m in workflow.split(",")]


def is_workflow_valid(workflow: str | Sequence[str], allowed: Sequence[str] = MODULES) -> bool:
    """Known modules, no repeats; QDS/QDP alone; otherwise ending in AG in the order QR < R < DS < AG."""
    modules = split_modules(workflow) if isinstance(workflow, str) else list(workflow)
    if not modules or any(m not in allowed for m in modules) or len(set(modules)) != len(modules):
        return False
    if any(m in DECOMPOSERS for m in modules):
        return len(modules) == 1
    order = [CHAIN_ORDER.index(m) for m in modules]
    return modules[-1] == "AG" and order == sorted(order)


def parse_workflow(text: str, allowed: Sequence[str] = MODULES) -> tuple[list[str] | None, bool]:
    """Exactly ``<workflow>M1,M2,...</workflow>`` (whitespace aside) holding a valid workflow."""
    match = _WORKFLOW.fullmatch(text)
    if not match:
        return None, False
    modules = split_modules(match.group(1))
    return (modules, True) if is_workflow_valid(modules, allowed) else (None, False)


def _without_tags(text: str, tag: str) -> str:
    return " ".join(text.replace(f"<{tag}>", " ").replace(f"</{tag}>", " ").split())


def parse_query(text: str, original: str, max_words: int = 100) -> tuple[str, bool]:
    """One ``<query>`` and nothing outside; differs from the original; at most ``max_words`` words.
    Fallback: the raw text (tags removed)."""
    found = _QUERY.findall(text)
    if len(found) == 1 and not _QUERY.sub("", text).strip():
        query = " ".join(found[0].split())
        if query and normalize_answer(query) != normalize_answer(original) and len(query.split()) <= max_words:
            return query, True
    return _without_tags(text, "query"), False


def parse_subquestions(text: str, original: str, min_subq: int = 2, max_subq: int = 4) -> tuple[list[str], bool]:
    """``<q1>..</q1><q2>..</q2>...`` numbered from 1, nothing outside, min_subq <= n <= max_subq, no
    duplicates and none equal to the original. Invalid output keeps its usable sub-questions (distinct,
    not the original, at most ``max_subq``); when none is left the original question is the only one."""
    found = _SUBQUESTION.findall(text)
    questions = [" ".join(q.split()) for _, q in found]
    keys = [normalize_answer(q) for q in questions]
    valid = (bool(found) and [int(n) for n, _ in found] == list(range(1, len(found) + 1))
             and not _SUBQUESTION.sub("", text).strip() and min_subq <= len(found) <= max_subq
             and all(keys) and len(set(keys)) == len(keys) and normalize_answer(original) not in keys)
    kept: dict[str, str] = {}
    for question, key in zip(questions, keys):
        if key and key != normalize_answer(original):
            kept.setdefault(key, question)
    usable = list(kept.values())[:max_subq]
    return (usable or [original]), valid


def parse_doc_ids(text: str, n_docs: int) -> tuple[list[int], bool]:
    """``<id>Document0,Document2</id>`` (empty allowed). Wrong tags: every doc is kept; out-of-range,
    malformed and repeated ids are dropped and the output is invalid."""
    match = _IDS.fullmatch(text)
    if not match:
        return list(range(n_docs)), False
    inner = match.group(1).strip()
    ids: list[int] = []
    valid = True
    for item in (inner.split(",") if inner else []):
        doc = _DOC_ID.fullmatch(item.strip())
        if doc is None or int(doc.group(1)) >= n_docs or int(doc.group(1)) in ids:
            valid = False
            continue
        ids.append(int(doc.group(1)))
    return ids, valid


def parse_answer(text: str, max_words: int = 40) -> tuple[str, bool]:
    """One ``<answer>`` and nothing outside, at most ``max_words`` \\w+ tokens. Fallback: the raw text."""
    found = _ANSWER.findall(text)
    if len(found) == 1 and not _ANSWER.sub("", text).strip() and len(_WORD.findall(found[0])) <= max_words:
        return " ".join(found[0].split()), True
    return _without_tags(text, "answer"), False


# -- costs -----------------------------------------------------------------------------------------
def round_cost(rounds: int, convention: str = "code", cap: int = 3) -> float:
    """min(T - 1, cap) / cap (the code: one round is free) or min(T, cap) / cap (the paper)."""
    if convention not in ROUND_COSTS:
        raise ValueError(f"round_cost must be one of {ROUND_COSTS}, not '{convention}'")
    counted = rounds - 1 if convention == "code" else rounds
    return min(max(counted, 0), cap) / cap


def retrieval_cost(retrievals: int, cap: int = 3) -> float:
    return min(retrievals, cap) / cap


# -- roles -----------------------------------------------------------------------------------------
@dataclass
class View:
    """What a role observes: its target question and the parts of the trace it needs."""

    question: str
    original: str = ""
    context: list[tuple[str, str]] = field(default_factory=list)     # (sub-question, answer); "" = unsolved
    docs: list[Passage] = field(default_factory=list)
    allowed: tuple[str, ...] = MODULES
    min_subq: int = 2
    max_subq: int = 4
    max_query_words: int = 100
    max_answer_words: int = 40


@dataclass(frozen=True)
class Role:
    tag: str                                          # compact system prompt (small word-level models)
    instructions: str                                 # full system prompt (Appendix E pattern)
    observe: Callable[[View, bool], str]              # (view, compact) -> the user message
    parse: Callable[[str, View], tuple[Any, bool]]    # (text, view) -> (parsed, is_valid)
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 48


def _pairs(context: Sequence[tuple[str, str]], compact: bool) -> str:
    if compact:
        return " | ".join(f"sub question : {q} answer : {a or 'unknown'}" for q, a in context)
    return "\n".join(f"- {q} -> {a or '(not answered)'}" for q, a in context)


def _docs(view: View) -> str:
    return SearchEnvironment.format(view.docs, "document") if view.docs else ""


def _observe_question(view: View, compact: bool) -> str:
    return f"question : {view.question}" if compact else f"Question: {view.question}"


def _observe_rewrite(view: View, compact: bool) -> str:
    if compact:
        solved = f" | {_pairs(view.context, True)}" if view.context else ""
        return f"main question : {view.original}{solved} | question : {view.question}"
    solved = f"Answered sub-questions:\n{_pairs(view.context, False)}\n" if view.context else ""
    main = f"Main question: {view.original}\n" if view.original else ""
    return f"{main}{solved}Current question: {view.question}"


def _observe_documents(view: View, compact: bool) -> str:
    docs = _docs(view)
    if compact:
        return f"question : {view.question} | documents : {docs}"
    return f"Question: {view.question}\nDocuments:\n{docs or '(none)'}"


def _observe_answer(view: View, compact: bool) -> str:
    docs = _docs(view)
    if compact:
        return f"documents : {docs} | question : {view.question}"
    return (f"Documents:\n{docs}\n" if docs else "") + f"Question: {view.question}"


def _observe_summary(view: View, compact: bool) -> str:
    if compact:
        return f"main question : {view.original} | {_pairs(view.context, True)}"
    return f"Main question: {view.original}\nSub-questions and their answers:\n{_pairs(view.context, False)}"


_SHORT_ANSWER_EXAMPLES = """Examples:
Question: Who wrote the novel "Pride and Prejudice"?
<answer>Jane Austen</answer>
Question: Are the Danube and the Rhine both rivers?
<answer>yes</answer>
Question: In which year did the Berlin Wall fall?
<answer>1989</answer>
Question: Which city is the capital of Australia?
<answer>Canberra</answer>"""

_PLANNER = """You are the Planner of a team of agents that answers questions with a search engine. Choose the \
workflow of modules that will answer the question.
Modules:
- QR (Query Rewriter): rewrites the question into a better search query.
- R (Retrieval): searches for documents about the query.
- DS (Document Selector): keeps only the retrieved documents that help.
- AG (Answer Generator): writes the answer, from the documents if any.
- QDS (Serial Decomposition): splits a multi-step question into sub-questions answered one after another.
- QDP (Parallel Decomposition): splits a question into independent sub-questions.
Requirements:
- QDS or QDP must be the only module of the workflow.
- Otherwise the workflow ends with AG, uses each module at most once and keeps the order QR, R, DS, AG.
Output the workflow strictly inside <workflow></workflow>, modules separated by commas, for example \
<workflow>R,AG</workflow>, <workflow>QR,R,DS,AG</workflow> or <workflow>QDS</workflow>. Output nothing else."""

_SUB_PLANNER = """You are the Planner for one sub-question of a larger question. Choose the workflow that answers it.
Modules:
- R (Retrieval): searches for documents about the sub-question.
- DS (Document Selector): keeps only the retrieved documents that help.
- AG (Answer Generator): writes the answer, from the documents if any.
Requirements: the workflow ends with AG, uses each module at most once and keeps the order R, DS, AG.
Output the workflow strictly inside <workflow></workflow>, for example <workflow>R,DS,AG</workflow>. \
Output nothing else."""

_QR = """You are the Query Rewriter. Rewrite the current question into one short search-engine query that \
finds the documents needed to answer it. When sub-questions of the main question have already been answered, \
use their answers so that the query stands on its own.
Output the query strictly inside <query></query>. Output nothing else."""

_QDS = """You are the Serial Query Decomposer. Split the question into at most {max_subq} simpler sub-questions \
that are answered one after another; a later sub-question may depend on the answer of an earlier one.
Output each sub-question inside its own numbered tag, for example <q1>...</q1>\n<q2>...</q2>. Output nothing else."""

_QDP = """You are the Parallel Query Decomposer. Split the question into at most {max_subq} independent \
sub-questions that can be answered separately.
Output each sub-question inside its own numbered tag, for example <q1>...</q1>\n<q2>...</q2>. Output nothing else."""

_DS = """You are the Document Selector. Given a question and numbered documents, select the documents that \
help answer the question.
Output their ids strictly inside <id></id>, separated by commas, for example <id>Document0,Document2</id>; \
output <id></id> if none helps. Output nothing else."""

_AG = f"""You are the Answer Generator. Answer the question with a short answer (a name, a date, a number, a \
few words, or yes/no), using the documents when they are given.
Output the answer strictly inside <answer></answer>. Output nothing else.
{_SHORT_ANSWER_EXAMPLES}"""

_AS = f"""You are the Answer Summarizer. Given the main question and the answers to its sub-questions, give \
the short final answer to the main question (a name, a date, a number, a few words, or yes/no).
Output the answer strictly inside <answer></answer>. Output nothing else.
{_SHORT_ANSWER_EXAMPLES}"""


def _parse_plan(text: str, view: View) -> tuple[list[str] | None, bool]:
    return parse_workflow(text, view.allowed)


def _parse_rewrite(text: str, view: View) -> tuple[str, bool]:
    return parse_query(text, view.question, view.max_query_words)


def _parse_decomposition(text: str, view: View) -> tuple[list[str], bool]:
    return parse_subquestions(text, view.question, view.min_subq, view.max_subq)


def _parse_selection(text: str, view: View) -> tuple[list[int], bool]:
    return parse_doc_ids(text, len(view.docs))


def _parse_answer(text: str, view: View) -> tuple[str, bool]:
    return parse_answer(text, view.max_answer_words)


ROLES: dict[str, Role] = {
    "planner": Role("planner", _PLANNER, _observe_question, _parse_plan, ("</workflow>",), 24),
    "sub_planner": Role("sub planner", _SUB_PLANNER, _observe_question, _parse_plan, ("</workflow>",), 24),
    "qds": Role("QDS", _QDS, _observe_question, _parse_decomposition, (), 128),
    "qdp": Role("QDP", _QDP, _observe_question, _parse_decomposition, (), 128),
    "qr": Role("QR", _QR, _observe_rewrite, _parse_rewrite, ("</query>",), 48),
    "ds": Role("DS", _DS, _observe_documents, _parse_selection, ("</id>",), 48),
    "ag": Role("AG", _AG, _observe_answer, _parse_answer, ("</answer>",), 48),
    "as": Role("AS", _AS, _observe_summary, _parse_answer, ("</answer>",), 48),
}


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


@dataclass
class _Trace:
    """One question's episode state: the sample, tool statistics and the top-level workflow."""

    sample: Mapping[str, Any]
    stats: TrajectoryStats = field(default_factory=TrajectoryStats)
    workflow: str = ""
    calls: int = 0
    violations: int = 0


class JADEModule(AgentPPOModule):
    """JADE: Planner + Executors sharing one policy; PPO-GAE with a separate critic on the shared reward."""

    zoo_name = "jade"
    card_notes = (
        "JADE (arXiv 2601.21916) on the zoo's multi-role PPO base. Deviations from the paper and its code: "
        "(1) decode_mode=choice (the embedded default) lets each role pick one of its valid outputs by "
        "prefix-constrained decoding over the candidate strings (exact renormalised token log-probs) instead of "
        "free text or a softmax over whole-sequence scores; the candidates are all valid workflows, every subset "
        "of the k documents, QDS/QDP sets filled from one-hop question templates with the question's entity "
        "words, QR queries built from entity + relation search words, and AG/AS answers drawn from the entity "
        "words of the documents, question and trajectory, so choice mode never violates a format. "
        "(2) The embedded default is a tiny generated world (~70 entities, ~145 one-sentence passages), a "
        "2-layer word-level model and a hashed bag-of-words retriever instead of Qwen2.5-7B, E5 and Wikipedia. "
        "(3) Defaults follow the spec's recommendations: reward_assignment=broadcast (the code), format penalty "
        "-1 (the paper; the code uses -2), round cost (T-1)/3 (the code), max_depth=1, QDP enabled, 2-4 "
        "sub-questions, a learned Sub-Planner (fixed_subworkflow=R,DS,AG reproduces the released code), greedy "
        "evaluation (eval_decoding=sample_t1 reproduces the code's effective sampling). "
        "(4) Invalid QR/AG/AS outputs fall back to the raw text with the role's tags removed; an invalid "
        "decomposition keeps its distinct usable sub-questions (at most max_subq). "
        "(5) env 'turns' counts rounds T (code convention), 'transitions' counts LLM calls. "
        "(6) Terminal reward placement is trained as per-transition return-to-go, which equals GAE over the "
        "flattened trajectory for gamma = lambda = 1. "
        "(7) max_rounds caps the code's round count: with the demo's 2 rounds a QDS plan answers only its first "
        "sub-question (the rest reach AS unanswered), so two-hop world questions are rarely solved there; the "
        "demo trains at lr 1e-3 (the spec's demo says 1e-4; measured slower to learn).")

    roles: dict[str, Role] = ROLES

    def __init__(self, *args: Any, max_depth: int = 1, max_rounds: int = 5, fixed_subworkflow: str | None = None,
                 enable_qdp: bool = True, min_subq: int = 2, max_subq: int = 4,
                 reward_assignment: str = "broadcast", alpha: float = 0.0, beta: float = 0.0,
                 round_cost: str = "code", cost_cap: int = 3, max_query_words: int = 100, max_answer_words: int = 40,
                 prompt_style: str | None = None, role_max_new_tokens: dict[str, int] | None = None,
                 max_candidates: int = 64, **kwargs: Any) -> None:
        if reward_assignment not in REWARD_ASSIGNMENTS:
            raise ValueError(f"reward_assignment must be one of {REWARD_ASSIGNMENTS}, not '{reward_assignment}'")
        if round_cost not in ROUND_COSTS:
            raise ValueError(f"round_cost must be one of {ROUND_COSTS}, not '{round_cost}'")
        if prompt_style is not None and prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES} or null, not '{prompt_style}'")
        if fixed_subworkflow is not None and not is_workflow_valid(fixed_subworkflow, SUB_MODULES):
            raise ValueError(f"fixed_subworkflow '{fixed_subworkflow}' is not a valid workflow over {SUB_MODULES}")
        if not 1 <= min_subq <= max_subq:
            raise ValueError(f"need 1 <= min_subq <= max_subq, not {min_subq}, {max_subq}")
        if max_depth < 0 or max_rounds < 1 or cost_cap < 1:
            raise ValueError("need max_depth >= 0, max_rounds >= 1 and cost_cap >= 1")
        unknown = set(role_max_new_tokens or {}) - set(ROLES)
        if unknown:
            raise ValueError(f"role_max_new_tokens has unknown roles {sorted(unknown)}; roles: {sorted(ROLES)}")
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()

    # -- configuration views -------------------------------------------------------------------
    @property
    def compact(self) -> bool:
        style = self.hparams.prompt_style or ("compact" if self.hparams.decode_mode == "choice" else "full")
        return style == "compact"

    @property
    def planner_modules(self) -> tuple[str, ...]:
        return tuple(m for m in MODULES if m != "QDP" or self.hparams.enable_qdp)

    def view(self, question: str, **parts: Any) -> View:
        h = self.hparams
        return View(question, min_subq=h.min_subq, max_subq=h.max_subq, max_query_words=h.max_query_words,
                    max_answer_words=h.max_answer_words, **parts)

    # -- one LLM call ----------------------------------------------------------------------------
    def call(self, role: str, view: View) -> Call:
        spec = self.roles[role]
        system = spec.tag if self.compact else spec.instructions.format(max_subq=self.hparams.max_subq)
        budget = dict(self.hparams.role_max_new_tokens or {}).get(role, spec.max_new_tokens)
        candidates = self.candidates(role, view) if self.hparams.decode_mode == "choice" else None
        return Call(role, spec.observe(view, self.compact), candidates=candidates, system=system,
                    max_new_tokens=budget, stop=spec.stop)

    def parse(self, role: str, text: str, view: View) -> tuple[Any, bool]:
        return self.roles[role].parse(text, view)

    def act(self, trace: _Trace, role: str, view: View) -> Episode:
        """Yield one call, parse its response and mark the transition invalid on a format violation."""
        response = yield self.call(role, view)
        parsed, valid = self.parse(role, response.text, view)
        trace.calls += 1
        if not valid:
            response.transition.valid = False
            trace.violations += 1
        response.transition.info["parsed"] = parsed
        return parsed, response.transition

    # -- choice decoding: the candidate outputs of each role ---------------------------------------
    def entity_words(self, text: str) -> list[str]:
        """Words that can fill a slot (the world's named things), in order of appearance."""
        return _unique(_ENTITY.findall(text))

    def subquestion_templates(self) -> list[str]:
        return [spec[3] for spec in RELATIONS.values()]

    def relation_words(self) -> list[str]:
        return [spec[4] for spec in RELATIONS.values()]

    def candidates(self, role: str, view: View) -> list[str] | None:
        """Valid outputs of a role for choice decoding (None: nothing to fill, generate freely)."""
        if role in ("planner", "sub_planner"):
            options = [f"<workflow>{','.join(w)}</workflow>" for w in self.workflows(view.allowed)]
        elif role in ("qds", "qdp"):
            filled = [t.format(s=e) for e in self.entity_words(view.question) for t in self.subquestion_templates()]
            options = ["".join(f"<q{i + 1}>{q}</q{i + 1}>" for i, q in enumerate(group))
                       for n in range(view.min_subq, view.max_subq + 1) for group in itertools.combinations(filled, n)]
        elif role == "qr":
            known = self.entity_words(" ".join([view.question, *(a for _, a in view.context)]))
            options = [f"<query>{e} {w}</query>" for e in known for w in self.relation_words()]
        elif role == "ds":
            ids = range(len(view.docs))
            options = [f"<id>{','.join(f'Document{i}' for i in group)}</id>"
                       for n in range(len(view.docs) + 1) for group in itertools.combinations(ids, n)]
        elif role == "ag":
            seen = " ".join([*(p.contents() for p in view.docs), view.question, *(a for _, a in view.context)])
            options = [f"<answer>{e}</answer>" for e in self.entity_words(seen)]
        elif role == "as":
            seen = " ".join([*(a for _, a in view.context), view.original, *(q for q, _ in view.context)])
            options = [f"<answer>{e}</answer>" for e in self.entity_words(seen)]
        else:
            raise KeyError(f"no candidates for role '{role}'")
        options = [c for c in _unique(options) if self.parse(role, c, view)[1]][:self.hparams.max_candidates]
        return options or None

    @staticmethod
    def workflows(allowed: Sequence[str]) -> list[list[str]]:
        """Every valid workflow over ``allowed``: the chains (shortest first), then the decompositions."""
        steps = [m for m in CHAIN_ORDER[:-1] if m in allowed]
        chains = [[*group, "AG"] for n in range(len(steps) + 1) for group in itertools.combinations(steps, n)]
        return [w for w in chains + [[m] for m in DECOMPOSERS] if is_workflow_valid(w, allowed)]

    # -- the episode -----------------------------------------------------------------------------
    def episode(self, sample: Mapping[str, Any], index: int) -> Episode:
        trace = _Trace(sample)
        answer, rounds = yield from self.solve(trace, sample["question"], depth=0, budget=self.hparams.max_rounds)
        trace.stats.turns = rounds
        kind = trace.workflow if trace.workflow in DECOMPOSERS else "direct"
        metrics = {"rounds": float(rounds), "retrievals": float(trace.stats.searches),
                   "format_violation_rate": trace.violations / max(trace.calls, 1),
                   **{f"workflow/{k}": float(k == kind) for k in ("direct", "QDS", "QDP")}}
        return {"prediction": answer, "stats": trace.stats, "rounds": rounds, "retrievals": trace.stats.searches,
                "workflow": trace.workflow, "metrics": metrics}

    def solve(self, trace: _Trace, question: str, depth: int, budget: int) -> Episode:
        """Plan one node and carry the plan out; returns (answer, rounds used)."""
        top = depth < self.hparams.max_depth
        role = "planner" if top else "sub_planner"
        allowed = self.planner_modules if top else SUB_MODULES
        modules, plan = yield from self.act(trace, role, self.view(question, allowed=allowed))
        if modules is None:
            modules = ["QDS"] if top else ["R", "AG"]
        if not top and self.hparams.fixed_subworkflow:
            modules = split_modules(self.hparams.fixed_subworkflow)
        plan.info["workflow"] = ",".join(modules)
        if depth == 0:
            trace.workflow = plan.info["workflow"]
        if modules[0] in DECOMPOSERS:
            return (yield from self.decompose(trace, question, modules[0], depth, budget))
        return (yield from self.chain(trace, question, modules)), 1

    def decompose(self, trace: _Trace, question: str, kind: str, depth: int, budget: int) -> Episode:
        """QDS/QDP, the sub-questions (serially with QR rewrites, or in one parallel round), then AS."""
        subquestions, _ = yield from self.act(trace, kind.lower(), self.view(question))
        solved: list[tuple[str, str]] = []
        used = 1
        if kind == "QDS":
            for sub in subquestions:
                if used >= budget:
                    break
                query, _ = yield from self.act(trace, "qr", self.view(sub, original=question, context=list(solved)))
                answer, rounds = yield from self.solve(trace, query, depth + 1, budget - used)
                used += rounds
                solved.append((query, answer))
        elif used < budget:
            longest = 0
            for sub in subquestions:
                answer, rounds = yield from self.solve(trace, sub, depth + 1, budget - used)
                longest = max(longest, rounds)
                solved.append((sub, answer))
            used += longest
        unsolved = [(sub, "") for sub in subquestions[len(solved):]]
        answer, _ = yield from self.act(trace, "as", self.view(question, original=question, context=solved + unsolved))
        return answer, used

    def chain(self, trace: _Trace, question: str, modules: Sequence[str]) -> Episode:
        """[QR] -> [R] -> [DS] -> AG on one node; DS and AG see the node's question, R the (rewritten) query."""
        query = question
        if "QR" in modules:
            query, _ = yield from self.act(trace, "qr", self.view(question))
        docs: list[Passage] = self.retrieve(trace, query) if "R" in modules else []
        if "DS" in modules:
            keep, _ = yield from self.act(trace, "ds", self.view(question, docs=docs))
            docs = [docs[i] for i in keep]
        answer, _ = yield from self.act(trace, "ag", self.view(question, docs=docs))
        return answer

    def retrieve(self, trace: _Trace, query: str) -> list[Passage]:
        """The retrieval agent: a frozen tool call (no transition)."""
        if self.env is None:
            raise RuntimeError("JADEModule needs a search environment: train with a datamodule that has "
                               "environment() (e.g. AgenticQADataModule) or assign module.env")
        return self.env.search(query, question=trace.sample["question"], within=trace.sample.get("within"),
                               stats=trace.stats)

    # -- reward ------------------------------------------------------------------------------------
    def global_reward(self, outcome: Mapping[str, Any], sample: Mapping[str, Any]) -> float:
        """R_global = answer score (EM for yes/no gold, else F1) - alpha * c_rnd - beta * c_ret."""
        h = self.hparams
        performance = answer_score(outcome["prediction"], sample["golden_answers"])
        costs = (h.alpha * round_cost(int(outcome.get("rounds", 1)), h.round_cost, h.cost_cap)
                 + h.beta * retrieval_cost(int(outcome.get("retrievals", 0)), h.cost_cap))
        return performance - costs

    def assign_rewards(self, samples: Sequence[Mapping[str, Any]], outcomes: Sequence[dict[str, Any]],
                       transitions: Sequence[list[Transition]]) -> None:
        """``info['step_reward']`` = r_{t,k} (format penalty, plus R_global on every step or the last);
        ``reward`` (what GAE sees) = r_{t,k} (broadcast) or its return-to-go within the question (terminal)."""
        terminal = self.hparams.reward_assignment == "terminal"
        for sample, outcome, steps in zip(samples, outcomes, transitions):
            total = self.global_reward(outcome, sample)
            outcome.setdefault("metrics", {})["reward"] = total
            step_rewards = [0.0 if t.valid else float(self.hparams.format_penalty) for t in steps]
            for k in (range(len(steps))[-1:] if terminal else range(len(steps))):
                step_rewards[k] += total
            to_go = 0.0
            for t, step_reward in zip(reversed(steps), reversed(step_rewards)):
                to_go += step_reward
                t.info["step_reward"] = step_reward
                t.reward = to_go if terminal else step_reward

    # -- evaluation: also the seconds each question took -------------------------------------------
    def evaluate_batch(self, batch: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        super().evaluate_batch(batch)
        self.accumulate_metrics({"seconds": time.perf_counter() - started}, 0)
