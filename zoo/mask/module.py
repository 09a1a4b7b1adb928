"""M-ASK (Chen et al., arXiv 2601.04703): one shared LLM plays five agents of agentic search, trained with
PPO on turn-level ΔF1 rewards.

Search-behaviour agents (Planning, Search, Answer) and knowledge-management agents (Summary, Update)
act one at a time on a shared knowledge state ``K = {question, trajectory t1..tn of (q, a), â}``::

    Plan(Q) -> K_0, F1_0
    for i in 1..I_max:
        Search(K, history) -> <end> (stop; a reward-0 transition, no retrieval) | <search>q_i</search>
        Retrieve top-k docs for q_i                                   (a tool: no transition)
        Summary(q_i, docs) -> evidence e_i; history += (q_i, e_i)
        Update(K, q_i, e_i) -> <Update>tj</Update> (replace step tj) | <Add>t(n+1)</Add> (append)
        Answer(K) -> â_i, F1_i

Rewards (the released code's active path; p = ``format_penalty`` when that call's output is illegal):
Planning F1_0 + p, Answer_i F1_i + p, and Search_i / Summary_i / Update_i share the turn's improvement,
``c_turn + (F1_i - F1_{i-1}) + p`` (``kma_reward: f1_plus_delta`` adds F1_i). With c_turn = 0 and legal
outputs the Search rewards telescope to F1_last - F1_0: the search and knowledge agents are paid for
what they add to the parametric-only answer. ``reward_mode: final_only`` gives every transition
F1_last + p (the outcome-only ablation). F1 is EM when a gold alias is yes/no.

Every call is one transition of one PPO buffer (``AgentPPOModule``: separate critic, GAE with
γ = λ = 1, so a transition's advantage is its own reward minus V, whitened over the batch).

``decode_mode: choice`` (the generated-world demo) lets each agent pick one of its legal outputs:
Search ``<end>`` or ``<search> entity relation-words </search>`` for entities of the question or
trajectory; Summary one sentence of the retrieved documents or "No useful information"; Update each
existing step or the next Add; Planning and Answer an entity inside their tags (Planning guesses from
the corpus's entities, its stand-in for parametric knowledge). ``free`` decoding (real models) writes
text that the strict parsers below check, with the reference code's fallbacks.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from zoo.blocks.qa import answer_score
from zoo.blocks.search_env import Passage, TrajectoryStats
from zoo.blocks.world import RELATIONS
from zoo.policy_gradient.agents import (
    AgentPPOModule,
    Call,
    Episode,
    Response,
    Transition,
)

__all__ = ["KnowledgeState", "MASKModule", "Plan", "SearchAction", "UpdateAction", "parse_answer",
           "parse_planning", "parse_search", "parse_summary", "parse_update"]

ROLES = ("planning", "search", "summary", "update", "answer")
REWARD_MODES = ("turn_level", "final_only")
KMA_REWARDS = ("delta", "f1_plus_delta")
INSTRUCTIONS = ("full", "role_only")
UNKNOWN = "unkown"                      # (sic) the literal the reference prompts ask for
NO_INFO = "No useful information"
MAX_PLAN_STEPS = 5
MAX_EVIDENCE_WORDS = 75
DEFAULT_BUDGETS = {"planning": 160, "search": 40, "summary": 100, "update": 12, "answer": 40}
STOPS = {"planning": ("</final_answer>",), "search": ("</search>", "<end>"), "summary": ("</evidence>",),
         "update": ("</Update>", "</Add>"), "answer": ("</final_answer>",)}

_FLAGS = re.DOTALL | re.IGNORECASE
# Entities of the generated world and the words a search for each of their relations uses.
_ENTITY = re.compile(r"\b(Entity|City|Country|Company)\d+\b")
_KIND = {"Entity": "person", "City": "city", "Country": "country", "Company": "company"}
_SEARCH_WORDS = {kind: [words for subject, _, _, _, words in RELATIONS.values() if subject == kind]
                 for kind in _KIND.values()}


# -- the shared knowledge state --------------------------------------------------------------
@dataclass
class KnowledgeState:
    """``K``: the question, the thinking trajectory (t1..tn -> (sub-question, answer)) and the answer."""

    question: str
    trajectory: dict[str, tuple[str, str]] = field(default_factory=dict)
    final_answer: str = UNKNOWN

    @classmethod
    def from_plan(cls, question: str, plan: Plan, collapse: bool = False) -> KnowledgeState:
        """K_0 from the plan (renumbered t1..tn); ``collapse`` keeps only (Q, â_0) as the released code does."""
        steps = [(question, plan.final_answer)] if collapse else (list(plan.steps) or [(question, UNKNOWN)])
        return cls(question, {f"t{i}": step for i, step in enumerate(steps, start=1)}, plan.final_answer)

    @property
    def keys(self) -> list[str]:
        return list(self.trajectory)

    def render(self) -> str:
        return "\n".join(f"{key}: Q: {q} | A: {a}" for key, (q, a) in self.trajectory.items())

    def copy(self) -> KnowledgeState:
        return copy.deepcopy(self)

    def apply_update(self, action: str, target: str, query: str, evidence: str) -> KnowledgeState:
        """A new state with step ``target`` replaced (``update``) or appended (``add``) by (query, evidence)."""
        n = len(self.trajectory)
        if action == "update" and target not in self.trajectory:
            raise ValueError(f"cannot update '{target}': the trajectory has {self.keys}")
        if action == "add" and target != f"t{n + 1}":
            raise ValueError(f"cannot add '{target}': the next step of a {n}-step trajectory is t{n + 1}")
        if action not in ("update", "add"):
            raise ValueError(f"unknown update action '{action}'; choose update or add")
        new = self.copy()
        new.trajectory[target] = (query, evidence)
        return new

    def with_answer(self, answer: str) -> KnowledgeState:
        new = self.copy()
        new.final_answer = answer
        return new


# -- strict parsers: (parsed, legal) with the reference code's fallbacks ------------------------
class Plan(NamedTuple):
    steps: list[tuple[str, str]]
    final_answer: str
    legal: bool


class SearchAction(NamedTuple):
    action: str          # "search" | "end"
    query: str
    legal: bool


class UpdateAction(NamedTuple):
    action: str          # "update" | "add"
    target: str
    legal: bool


def _first_line_snippet(text: str) -> str:
    """The first line's first 200 characters, punctuation turned into spaces."""
    snippet = text.strip().split("\n")[0][:200]
    return " ".join(re.sub(r"[^A-Za-z0-9\s]", " ", snippet).split())


def _outside(text: str, *patterns: str) -> str:
    for pattern in patterns:
        text = re.sub(pattern, "", text, flags=_FLAGS)
    return text.strip()


def parse_planning(text: str, question: str) -> Plan:
    """``<q1>..</q1><a1>..</a1>..<final_answer>..</final_answer>``.

    Illegal: text outside these tags, no q/a tags, tags out of the q1 a1 q2 a2 .. order, more than
    five sub-questions, or a repeated sub-question. Without q/a tags, "x: y" lines become the steps;
    without a final-answer tag, the last line (or "unkown") is the answer.
    """
    if not text.strip():
        return Plan([(question, UNKNOWN)], UNKNOWN, False)
    legal = True
    questions = {int(n): s.strip() for n, s in re.findall(r"<q(\d+)>(.*?)</q\1>", text, _FLAGS)}
    answers = {int(n): s.strip() for n, s in re.findall(r"<a(\d+)>(.*?)</a\1>", text, _FLAGS)}
    if questions or answers:
        steps = [(questions.get(i, ""), answers.get(i, UNKNOWN)) for i in sorted(questions.keys() | answers.keys())]
    else:
        legal = False
        lines = [line.strip() for line in text.strip().split("\n") if line.strip()]
        steps = [(q.strip(), a.strip() or UNKNOWN) for q, a in (line.split(":", 1) for line in lines if ":" in line)]
    final = re.search(r"<final_answer>(.*?)</final_answer>", text, _FLAGS)
    if final:
        answer = final.group(1).strip()
    else:
        lines = [line.strip() for line in text.strip().split("\n") if line.strip()]
        answer = lines[-1] if lines and len(lines[-1]) <= 500 else UNKNOWN
    if _outside(text, r"<q\d+>.*?</q\d+>", r"<a\d+>.*?</a\d+>", r"<final_answer>.*?</final_answer>"):
        legal = False
    order = [(kind.lower(), int(n)) for kind, n in re.findall(r"<\s*(q|a)(\d+)\s*>", text, re.IGNORECASE)]
    expected = [(kind, i) for i in range(1, max((n for _, n in order), default=0) + 1) for kind in "qa"]
    if not order or order != expected[:len(order)]:
        legal = False
    subquestions = [q for q, _ in steps]
    if len(subquestions) > MAX_PLAN_STEPS or len(set(subquestions)) < len(subquestions):
        legal = False
    return Plan(steps or [(question, UNKNOWN)], answer or UNKNOWN, legal)


def parse_search(text: str) -> SearchAction:
    """Exactly ``<search>query</search>`` or ``<end>``.

    Illegal: more than one search tag, or other text. Untagged text searches its first line
    (punctuation stripped); empty output ends the search.
    """
    tags = re.findall(r"<search>(.*?)</search>", text, _FLAGS)
    legal = len(tags) <= 1 and not _outside(text, r"<search>.*?</search>", r"<end>")
    if tags:
        return SearchAction("search", tags[0].strip(), legal)
    if re.search(r"<end>", text, re.IGNORECASE):
        return SearchAction("end", "", legal)
    snippet = _first_line_snippet(text)
    return SearchAction("search", snippet, False) if snippet else SearchAction("end", "", False)


def parse_summary(text: str, query: str = "", documents: Sequence[str] = ()) -> tuple[str, bool]:
    """``<evidence>..</evidence>`` (or "No useful information"): (evidence, legal).

    Illegal: more than one tag, text outside, or evidence over 75 words (still returned). Untagged
    output falls back to its first line, then to the document sentence sharing most query words,
    then to "No useful information".
    """
    tags = re.findall(r"<evidence>(.*?)</evidence>", text, _FLAGS)
    if tags:
        evidence = tags[0].strip()
        legal = (len(tags) == 1 and not _outside(text, r"<evidence>.*?</evidence>")
                 and len(evidence.split()) <= MAX_EVIDENCE_WORDS)
        return evidence, legal
    snippet = _first_line_snippet(text)
    if snippet:
        lowered = snippet.lower()
        return (NO_INFO if any(k in lowered for k in ("no useful", "unknown", "none", "unavailable")) else snippet), False
    terms = [t.lower() for t in query.split()]
    best, best_overlap = NO_INFO, 0
    for document in documents:
        for sentence in re.split(r"[.!?]", document):
            overlap = sum(term in sentence.lower() for term in terms)
            if overlap > best_overlap:
                best, best_overlap = sentence.strip(), overlap
    return best, False


def parse_update(text: str, keys: Sequence[str]) -> UpdateAction:
    """Exactly ``<Update>ti</Update>`` (ti an existing step) or ``<Add>t(n+1)</Add>`` (no leading zeros).

    Illegal: two action tags, text outside, an unknown step, a wrong or zero-padded index, or no tag;
    an illegal output is treated as Add t(n+1).
    """
    fallback = UpdateAction("add", f"t{len(keys) + 1}", False)
    updates = re.findall(r"<Update>(.*?)</Update>", text, _FLAGS)
    adds = re.findall(r"<Add>(.*?)</Add>", text, _FLAGS)
    if len(updates) + len(adds) != 1 or _outside(text, r"<Update>.*?</Update>", r"<Add>.*?</Add>"):
        return fallback
    if updates:
        target = updates[0].strip()
        return UpdateAction("update", target, True) if target in keys else fallback
    target = adds[0].strip()
    index = re.fullmatch(r"t([1-9]\d*)", target)
    return UpdateAction("add", target, True) if index and int(index.group(1)) == len(keys) + 1 else fallback


def parse_answer(text: str, state: KnowledgeState) -> tuple[str, bool]:
    """``<final_answer>..</final_answer>``: (answer, legal).

    Illegal: more than one tag or text outside. Untagged output falls back to its first line, an
    empty answer to the trajectory's first answer.
    """
    tags = re.findall(r"<final_answer>(.*?)</final_answer>", text, _FLAGS)
    legal = len(tags) == 1 and not _outside(text, r"<final_answer>.*?</final_answer>")
    answer = tags[0].strip() if tags else text.strip().split("\n")[0].strip()
    if not answer:
        legal = False
        answer = next(iter(state.trajectory.values()), ("", UNKNOWN))[1]
    return answer, legal


# -- role instructions (free decoding; paraphrasing the reference prompts) -------------------
_FORMAT_EXAMPLES = """Examples of the answer style:
Question: When did the simpsons first air on television? Answer: <final_answer>December 17, 1989</final_answer>
Question: Who said i'm late i'm late for a very important date? Answer: <final_answer>The White Rabbit</final_answer>
Question: Where does the short happy life of francis macomber take place? Answer: <final_answer>Africa</final_answer>
Question: How many seasons are there of star wars the clone wars? Answer: <final_answer>6</final_answer>
Question: Which us president appears as a character in the play annie? Answer: <final_answer>Franklin D. Roosevelt</final_answer>
Question: Are Calochone and Adlumia both plants? Answer: <final_answer>yes</final_answer>
Question: Yukio Mishima and Roberto Bolano, are Chilean? Answer: <final_answer>no</final_answer>"""

SYSTEM_PROMPTS = {
    "planning": (
        "You are a knowledgeable reasoning assistant. Decompose the question into sub-questions and answer "
        "each from your own knowledge, without any tool. Write 'unkown' for a sub-answer you do not know. "
        "Output only tags, numbered in order:\n<q1>sub-question</q1>\n<a1>answer</a1>\n<q2>...</q2>\n<a2>...</a2>\n"
        "At most five sub-questions. End with your short answer to the original question in "
        "<final_answer>...</final_answer>.\n" + _FORMAT_EXAMPLES),
    "search": (
        "You are a search query generation assistant. You see the original question, a thinking trajectory of "
        "sub-questions and answers, and the search history of queries you already issued. Never repeat a query "
        "that is identical or similar to one in the history. If a sub-answer is 'unkown' or unclear, or a new "
        "sub-question is needed, write one specific searchable query; if no more search is needed, stop.\n"
        "Output exactly one of:\n<search>your query</search>\n<end>\nNo other text."),
    "summary": (
        "You are an evidence extraction assistant. From the candidate documents, extract the key evidence that "
        "directly answers the query, in at most 75 words. If there is none, say so.\n"
        "Output exactly one of:\n<evidence>key evidence</evidence>\n<evidence>No useful information</evidence>\n"
        "No other text."),
    "update": (
        "You are an update detection assistant. You see the original question, its thinking trajectory (steps "
        "t1..tn), the current final answer, and a new query with its evidence. If the new query and evidence "
        "replace an existing step ti, output <Update>ti</Update>. If they add information the trajectory lacks, "
        "output <Add>t(n+1)</Add> with n the current number of steps. Output exactly one tag and no other text."),
    "answer": (
        "You are a final answer generation assistant. Use the answers in the thinking trajectory to answer the "
        "original question as briefly as possible.\n" + _FORMAT_EXAMPLES +
        "\nOutput exactly <final_answer>your answer</final_answer> with no other text and no reasoning."),
}
# One known word per role: the tiny word-level demo model's vocabulary has none of the instructions' words.
ROLE_HEADERS = {"planning": "plan", "search": "search", "summary": "summary", "update": "update", "answer": "answer"}


class MASKModule(AgentPPOModule):
    """M-ASK: five role-prompted agents over one policy; turn-level ΔF1 rewards; PPO-GAE with a critic."""

    zoo_name = "mask"
    card_notes = (
        "M-ASK (arXiv 2601.04703) on the zoo's multi-role PPO core (AgentPPOModule). The paper body was not "
        "available: the rollout, parsers and rewards follow the released code (chenyiqun/M-ASK) as the spec "
        "describes them. Deviations: (1) collapse_plan=false by default (the paper's reading: K_0 holds the "
        "plan's sub-questions; the code collapses it to (Q, a_0)); (2) an illegal <end> gets the format penalty "
        "(the code gives every <end> 0); (3) an Update output with both an <Update> and an <Add> tag is illegal "
        "(the code takes the Add); (4) plan steps are renumbered t1..tn so an Add can never overwrite one; "
        "(5) evaluation decodes greedily (eval_decoding=sample_t1 reproduces the code's temperature-1 "
        "validation); (6) prompts paraphrase the reference prompts; the tiny demo model sees a one-word role "
        "header instead (instructions=role_only); (7) kma_reward=f1_plus_delta applies to all three roles that "
        "share the ΔF1 (Search, Summary, Update); (8) without knowledge agents the retrieved documents "
        "accumulate and go to the Answer agent. Choice decoding (the generated-world demo) restricts each agent "
        "to legal outputs: Search <end> or an entity of the question/trajectory plus a relation's search words; "
        "Summary one retrieved sentence or 'No useful information'; Update each step or the next Add; Planning "
        "and Answer an entity in their tags (Planning's guesses range over the corpus's entities, its stand-in "
        "for parametric knowledge; Answer's over the entities of the state).")

    def __init__(self, *args: Any, max_turns: int = 5, top_k: int = 5, reward_mode: str = "turn_level",
                 kma_reward: str = "delta", use_knowledge_agents: bool = True, collapse_plan: bool = False,
                 turn_cost: float = 0.0, end_format_penalty: bool = True, instructions: str = "full",
                 role_max_new_tokens: dict[str, int] | None = None, **kwargs: Any) -> None:
        for name, value, options in (("reward_mode", reward_mode, REWARD_MODES), ("kma_reward", kma_reward, KMA_REWARDS),
                                     ("instructions", instructions, INSTRUCTIONS)):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}, not '{value}'")
        if max_turns < 1 or top_k < 1:
            raise ValueError(f"max_turns and top_k must be >= 1 (got {max_turns}, {top_k})")
        unknown = set(role_max_new_tokens or {}) - set(ROLES)
        if unknown:
            raise ValueError(f"role_max_new_tokens has unknown roles {sorted(unknown)}; roles are {ROLES}")
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        self.budgets = {**DEFAULT_BUDGETS, **dict(role_max_new_tokens or {})}
        self._entity_pool: tuple[int, list[str]] | None = None

    # -- hooks: prompts ------------------------------------------------------------------------
    def instructions_for(self, role: str) -> str:
        return SYSTEM_PROMPTS[role] if self.hparams.instructions == "full" else ROLE_HEADERS[role]

    def planning_prompt(self, question: str) -> str:
        return f"Question: {question}"

    def search_prompt(self, state: KnowledgeState, history: Sequence[tuple[str, str]]) -> str:
        lines = [f"{i}. Query: {q} | Summary: {s}" for i, (q, s) in enumerate(history, start=1)]
        return (f"Original question: {state.question}\n\nThinking trajectory:\n{state.render()}\n\n"
                f"Search history:\n{chr(10).join(lines) or '(No previous searches)'}")

    def summary_prompt(self, query: str, documents: Sequence[Passage]) -> str:
        docs = "\n".join(f"Doc{i}: {p.contents()}" for i, p in enumerate(documents, start=1))
        return f"Query: {query}\nCandidate Documents:\n{docs}"

    def update_prompt(self, state: KnowledgeState, query: str, evidence: str) -> str:
        return (f"Original question: {state.question}\nFinal answer: {state.final_answer}\n"
                f"Thinking trajectory:\n{state.render()}\n\nNew query: {query}\nEvidence: {evidence}")

    def answer_prompt(self, state: KnowledgeState, documents: Sequence[Passage] = ()) -> str:
        prompt = f"Question: {state.question}\nThinking trajectory:\n{state.render()}"
        if documents:     # only without the knowledge agents: the raw search results
            prompt += "\nDocuments:\n" + "\n".join(f"Doc{i}: {p.contents()}" for i, p in enumerate(documents, start=1))
        return prompt

    # -- hooks: choice decoding's candidate outputs ----------------------------------------------
    def candidates(self, role: str, **context: Any) -> list[str]:
        """The legal outputs a role chooses among in ``decode_mode=choice`` (distinct strings)."""
        build = {"planning": self.planning_candidates, "search": self.search_candidates,
                 "summary": self.summary_candidates, "update": self.update_candidates,
                 "answer": self.answer_candidates}[role]
        return list(dict.fromkeys(build(**context)))

    def planning_candidates(self, question: str, **_: Any) -> list[str]:
        guesses = [UNKNOWN, *self.entity_pool()]
        return [f"<q1> {question} </q1> <a1> {g} </a1> <final_answer> {g} </final_answer>" for g in guesses]

    def search_candidates(self, state: KnowledgeState, **_: Any) -> list[str]:
        entities = _entities(f"{state.question}\n{state.render()}")
        return ["<end>"] + [f"<search> {e} {words} </search>" for e in entities
                            for words in _SEARCH_WORDS[_KIND[_ENTITY.match(e).group(1)]]]

    def summary_candidates(self, documents: Sequence[Passage], **_: Any) -> list[str]:
        sentences = [s.strip() for p in documents for s in re.split(r"(?<=[.!?])\s+", p.text) if s.strip()]
        return [f"<evidence> {s} </evidence>" for s in sentences] + [f"<evidence> {NO_INFO} </evidence>"]

    def update_candidates(self, state: KnowledgeState, **_: Any) -> list[str]:
        return [f"<Update> {key} </Update>" for key in state.keys] + [f"<Add> t{len(state.trajectory) + 1} </Add>"]

    def answer_candidates(self, state: KnowledgeState, documents: Sequence[Passage] = (), **_: Any) -> list[str]:
        text = "\n".join([state.question, state.render(), *(p.text for p in documents)])
        return [f"<final_answer> {e} </final_answer>" for e in [*_entities(text), UNKNOWN]]

    def entity_pool(self) -> list[str]:
        """Every entity named in the search corpus: the Planning agent's parametric guesses in choice mode."""
        env = self._environment()
        if self._entity_pool is None or self._entity_pool[0] != id(env):
            self._entity_pool = (id(env), sorted(_entities(" ".join(p.text for p in env.passages.values())),
                                                 key=_natural))
        return self._entity_pool[1]

    # -- the rollout ---------------------------------------------------------------------------
    def call(self, role: str, prompt: str, **context: Any) -> Call:
        choice = self.hparams.decode_mode == "choice"
        return Call(role, prompt, candidates=self.candidates(role, **context) if choice else None,
                    system=self.instructions_for(role), max_new_tokens=self.budgets[role], stop=STOPS[role])

    def reward_score(self, prediction: str, sample: Mapping[str, Any]) -> float:
        """F1, or EM when a gold alias is yes/no (the reward's score; logged metrics come from ``score``)."""
        return answer_score(prediction, sample["golden_answers"])

    def episode(self, sample: Mapping[str, Any], index: int) -> Episode:
        h = self.hparams
        env = self._environment()
        question = sample["question"]
        stats = TrajectoryStats()
        response = yield self.call("planning", self.planning_prompt(question), sample=sample, question=question)
        plan = parse_planning(response.text, question)
        _mark(response, plan.legal, turn=0)
        state = KnowledgeState.from_plan(question, plan, collapse=h.collapse_plan)
        scores = [self.reward_score(state.final_answer, sample)]
        history: list[tuple[str, str]] = []
        documents: list[Passage] = []
        counts = {"add": 0, "update": 0}
        end_turn = 0
        for turn in range(1, h.max_turns + 1):
            response = yield self.call("search", self.search_prompt(state, history), sample=sample, state=state,
                                       history=history)
            search = parse_search(response.text)
            _mark(response, search.legal, turn, end=search.action == "end", query=search.query)
            if search.action == "end":
                end_turn = turn
                break
            stats.turns += 1
            found = env.search(search.query, question=question, k=h.top_k, within=sample.get("within"), stats=stats)
            if h.use_knowledge_agents:
                response = yield self.call("summary", self.summary_prompt(search.query, found), sample=sample,
                                           query=search.query, documents=found)
                evidence, legal = parse_summary(response.text, search.query, [p.text for p in found])
                _mark(response, legal, turn)
                history.append((search.query, evidence))
                response = yield self.call("update", self.update_prompt(state, search.query, evidence),
                                           sample=sample, state=state, query=search.query, evidence=evidence)
                update = parse_update(response.text, state.keys)
                _mark(response, update.legal, turn, action=update.action)
                counts[update.action] += 1
                state = state.apply_update(update.action, update.target, search.query, evidence)
            else:
                documents += [p for p in found if p not in documents]
                history.append((search.query, "-"))
            response = yield self.call("answer", self.answer_prompt(state, documents), sample=sample, state=state,
                                       documents=documents)
            answer, legal = parse_answer(response.text, state)
            _mark(response, legal, turn)
            state = state.with_answer(answer)
            scores.append(self.reward_score(answer, sample))
        metrics = {"first_reward": scores[0], "last_reward": scores[-1], "reward_gain": scores[-1] - scores[0],
                   "adds": float(counts["add"]), "updates": float(counts["update"]), "ended": float(end_turn > 0)}
        return {"prediction": state.final_answer, "stats": stats, "scores": scores, "state": state,
                "end_turn": end_turn, "metrics": metrics}

    def _environment(self):
        if self.env is None:
            raise RuntimeError("MASKModule needs a search environment: train with a datamodule that has "
                               "environment() (e.g. datamodules.agentic_qa.AgenticQADataModule) or set module.env")
        return self.env

    # -- rewards -------------------------------------------------------------------------------
    def assign_rewards(self, samples: Sequence[Mapping[str, Any]], outcomes: Sequence[dict[str, Any]],
                       transitions: Sequence[list[Transition]]) -> None:
        for outcome, steps in zip(outcomes, transitions):
            for t in steps:
                t.reward = self.transition_reward(t, outcome["scores"])

    def transition_reward(self, t: Transition, scores: Sequence[float]) -> float:
        """The reward of one call given the question's score series F1_0..F1_I (see the module docstring)."""
        h = self.hparams
        penalty = 0.0 if t.valid else h.format_penalty
        if h.reward_mode == "final_only":
            return scores[-1] + penalty
        if t.info.get("end"):
            return penalty if h.end_format_penalty else 0.0
        turn = t.info["turn"]
        if t.role == "planning":
            return scores[0] + penalty
        if t.role == "answer":
            return scores[turn] + penalty
        delta = scores[turn] - scores[turn - 1]
        return h.turn_cost + (delta if h.kma_reward == "delta" else scores[turn] + delta) + penalty


def _mark(response: Response, legal: bool, turn: int, **info: Any) -> None:
    response.transition.valid = legal
    response.transition.info.update(turn=turn, **info)


def _natural(name: str) -> tuple[str, int]:
    match = re.match(r"(\D+)(\d+)$", name)
    return (match.group(1), int(match.group(2))) if match else (name, -1)


def _entities(text: str) -> list[str]:
    """Generated-world entity names in order of first mention."""
    return list(dict.fromkeys(m.group(0) for m in _ENTITY.finditer(text)))
