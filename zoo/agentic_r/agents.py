"""Search agents for Agentic-R: the episode protocol, the scripted stand-in and the Search-R1 PPO agent.

An agent is anything with ``max_searches`` and ``act(sample, steps, searches_left) -> Turn``:
given the question and the searches so far (each with the passages it got back), it either
searches again or answers. ``act`` must be deterministic (greedy) for the labelling stage: the
global answer correctness of a passage is measured by replaying a trajectory up to a search,
splicing that passage in as the search's result and letting the agent continue
(``replay``); replaying with the original passages reproduces the original answer.

``SearchTool`` is the retriever as the agent sees it: it builds the retriever's input from the
original question and the current query (``query_format``: ``q``, ``Q+q`` = "Q [SEP] q",
``Q+history+q``) and returns the top-k passages.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from zoo.blocks.qa import exact_match, token_f1
from zoo.blocks.search_env import Passage, SearchEnvironment, TrajectoryStats
from zoo.blocks.world import CHAINS, RELATIONS
from zoo.policy_gradient.agents import AgentPPOModule, Call

QUERY_FORMATS = ("q", "Q+q", "Q+history+q")
SEPARATOR = " [SEP] "


def check_query_format(query_format: str) -> str:
    if query_format not in QUERY_FORMATS:
        raise ValueError(f"unknown query_format '{query_format}'; choose one of {QUERY_FORMATS}")
    return query_format


def retriever_query(question: str, query: str, history: Sequence[str] = (), query_format: str = "Q+q") -> str:
    """The retriever's query text before its prefix: q, "Q [SEP] q" or "Q [SEP] h1 [SEP] ... [SEP] q"."""
    check_query_format(query_format)
    if query_format == "q":
        return query
    if query_format == "Q+q":
        return question + SEPARATOR + query
    return SEPARATOR.join([question, *history, query])


@dataclass
class SearchStep:
    """One search: the agent's turn text (reasoning plus the call), its query and the passages it got."""

    query: str
    passages: list[Passage]
    text: str = ""


@dataclass
class Turn:
    """What an agent does next: search ``query`` or answer ``answer``; ``text`` is what it wrote."""

    text: str = ""
    query: str | None = None
    answer: str | None = None


@dataclass
class Trajectory:
    sample: Mapping[str, Any]
    steps: list[SearchStep]
    answer: str
    text: str = ""
    stats: TrajectoryStats = field(default_factory=TrajectoryStats)

    @property
    def queries(self) -> list[str]:
        return [s.query for s in self.steps]

    def em(self) -> float:
        return exact_match(self.answer, self.sample["golden_answers"])

    def f1(self) -> float:
        return token_f1(self.answer, self.sample["golden_answers"])


class SearchAgent(Protocol):
    max_searches: int

    def act(self, sample: Mapping[str, Any], steps: Sequence[SearchStep], searches_left: int) -> Turn: ...


@dataclass
class SearchTool:
    """The retriever behind an agent's search call; sets the environment's query template."""

    env: SearchEnvironment
    query_format: str = "q"
    k: int = 3

    def __post_init__(self) -> None:
        check_query_format(self.query_format)
        self.env.query_format = "{query}" if self.query_format == "q" else "{question}" + SEPARATOR + "{query}"

    def search(self, question: str, query: str, history: Sequence[str] = (), k: int | None = None,
               stats: TrajectoryStats | None = None) -> list[Passage]:
        context = SEPARATOR.join([question, *history]) if self.query_format == "Q+history+q" else question
        return self.env.search(query, question=context, k=k or self.k, stats=stats)


def run_episode(agent: SearchAgent, sample: Mapping[str, Any], tool: SearchTool,
                prefix: Sequence[SearchStep] = ()) -> Trajectory:
    """Let the agent search and answer; ``prefix`` fixes the first searches and their results."""
    steps = list(prefix)
    stats = TrajectoryStats(turns=len(steps), searches=len(steps), valid_searches=len(steps))
    while True:
        searches_left = max(agent.max_searches - len(steps), 0)
        turn = agent.act(sample, steps, searches_left)
        stats.turns += 1
        if turn.answer is not None or turn.query is None or searches_left == 0:
            return Trajectory(sample, steps, turn.answer or "", turn.text, stats)
        passages = tool.search(sample["question"], turn.query, [s.query for s in steps], stats=stats)
        steps.append(SearchStep(turn.query, passages, turn.text))


def replay(agent: SearchAgent, trajectory: Trajectory, round_index: int, passages: Sequence[Passage],
           tool: SearchTool) -> Trajectory:
    """Continue ``trajectory`` after its search number ``round_index`` (1-based) returned ``passages``."""
    if not 1 <= round_index <= len(trajectory.steps):
        raise ValueError(f"round {round_index} is outside the trajectory's {len(trajectory.steps)} searches")
    step = trajectory.steps[round_index - 1]
    prefix = trajectory.steps[:round_index - 1] + [SearchStep(step.query, list(passages), step.text)]
    return run_episode(agent, trajectory.sample, tool, prefix)


# -- the scripted agent ---------------------------------------------------------------------------
_ENTITY = re.compile(r"\b(?:Entity|City|Country|Company)\d+\b")


def _template_regex(template: str, **slots: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, value in slots.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), value)
    return re.compile(pattern)


class ScriptedSearchAgent:
    """A deterministic agent for the synthetic world, with the trained agent's interface.

    It splits a two-hop question into its one-hop chain, searches "relation words + entity" for
    each hop, and reads each hop's answer from the first returned passage that states the
    relation for that entity ("Entity17 was born in (City4)"); when none does, it takes the last
    entity named in the first passage. Questions outside the world's templates get one search
    with the question itself.

    ``query_style="entity"`` searches the bare entity ("City4"): an under-specified query whose
    intent only the original question carries, the case a "Q [SEP] q" retriever is for.
    """

    QUERY_STYLES = ("relation", "entity")

    def __init__(self, max_searches: int = 5, query_style: str = "relation") -> None:
        if query_style not in self.QUERY_STYLES:
            raise ValueError(f"unknown query_style '{query_style}'; choose one of {self.QUERY_STYLES}")
        self.max_searches = max_searches
        self.query_style = query_style
        self._one_hop = [(_template_regex(q, s=r"(\S+)"), [rel]) for rel, (_, _, _, q, _) in RELATIONS.items()]
        self._two_hop = [(_template_regex(q, s=r"(\S+)"), [first, second]) for first, second, q in CHAINS.values()]

    def plan(self, question: str) -> tuple[str, list[str]] | None:
        """(subject, relation chain) of a templated world question, else None."""
        for regex, relations in self._two_hop + self._one_hop:
            found = regex.fullmatch(question.strip())
            if found:
                return found.group(1), relations
        return None

    @staticmethod
    def read(passages: Sequence[Passage], relation: str | None, subject: str) -> str:
        if relation is not None:
            regex = _template_regex(RELATIONS[relation][2], s=re.escape(subject), o=r"(\S+)")
            for passage in passages:
                found = regex.search(passage.text)
                if found:
                    return found.group(1)
        if not passages:
            return ""
        named = [e for e in _ENTITY.findall(passages[0].text) if e != subject]
        return named[-1] if named else passages[0].text.split()[-1]

    def act(self, sample: Mapping[str, Any], steps: Sequence[SearchStep], searches_left: int) -> Turn:
        plan = self.plan(sample["question"])
        if plan is None:
            if steps or not searches_left:
                answer = self.read(steps[-1].passages, None, "") if steps else ""
                return Turn(f"<answer> {answer} </answer>", answer=answer)
            return Turn(f"<search> {sample['question']} </search>", query=sample["question"])
        entity, relations = plan
        for hop, step in enumerate(steps[:len(relations)]):
            entity = self.read(step.passages, relations[hop], entity)
        hop = len(steps)
        if hop < len(relations) and searches_left:
            query = entity if self.query_style == "entity" else f"{RELATIONS[relations[hop]][4]} {entity}"
            return Turn(f"<search> {query} </search>", query=query)
        return Turn(f"<answer> {entity} </answer>", answer=entity)


# -- evaluation -----------------------------------------------------------------------------------
def evaluate_agent(agent: SearchAgent, tool: SearchTool, samples: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Sums over questions and searches (divide by ``count`` / ``searches``): answer EM and F1, and per
    search whether the rank-1 passage is the support passage of that hop (``support[i]`` for the
    i-th search: useful) or a distractor (an id starting with "distractor", the world's naming)."""
    sums = {"em": 0.0, "f1": 0.0, "count": 0.0, "searches": 0.0, "useful_at_1": 0.0, "distractor_at_1": 0.0}
    for sample in samples:
        trajectory = run_episode(agent, sample, tool)
        sums["em"] += trajectory.em()
        sums["f1"] += trajectory.f1()
        sums["count"] += 1
        support = list(sample.get("support") or ())
        for hop, step in enumerate(trajectory.steps):
            sums["searches"] += 1
            if step.passages:
                sums["useful_at_1"] += bool(support) and step.passages[0].id == support[min(hop, len(support) - 1)]
                sums["distractor_at_1"] += step.passages[0].id.startswith("distractor")
    return sums


def mean_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    per_question = {k: sums[k] / max(sums["count"], 1) for k in ("em", "f1")}
    per_search = {k: sums[k] / max(sums["searches"], 1) for k in ("useful_at_1", "distractor_at_1")}
    return {**per_question, **per_search, "searches_per_question": sums["searches"] / max(sums["count"], 1)}


# -- the Search-R1 agent trained with PPO ---------------------------------------------------------
SEARCH_R1_INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
    "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: {question}\n")
CHOICE_INSTRUCTION = "Question : {question}\n"
_SEARCH = re.compile(r"<search>(.*?)</search>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_turn(text: str) -> tuple[str | None, str | None]:
    """(search query, answer) of one agent turn; an answer wins when both appear."""
    answer = _ANSWER.search(text)
    if answer:
        return None, answer.group(1).strip()
    query = _SEARCH.search(text)
    return (query.group(1).strip(), None) if query else (None, None)


class SearchAgentModule(AgentPPOModule):
    """Search-R1's agent: think, <search> q </search>, read <information>, <answer> a </answer>; PPO-GAE on EM.

    Every turn is one call of the shared policy: its prompt is the instruction, the question and the
    turns so far with their <information> blocks; its response is the turn's text, stopped at
    </search> or </answer>. Retrieved passages are therefore only ever prompt tokens, so they are
    excluded from the policy and value losses (Search-R1's state masking) by construction. The
    reward is the final answer's EM; given to every transition of the question, it is the return
    of a terminal reward under the default gamma = lambda = 1.

    ``decode_mode="choice"`` (the tiny world model): each turn picks among "<search> relation
    words + entity </search>" and "<answer> entity </answer>" over the entities seen so far.
    ``free``: free text (real models, e.g. SmolLM2). ``retriever_input`` is the retriever's query
    format (``q`` against the base retriever, ``Q+q`` against a trained Agentic-R). ``act`` makes the module a ``SearchAgent``
    for the labeller: one greedy turn at a time (keep ``eval_decoding=greedy``).
    """

    zoo_name = "agentic_r"
    card_notes = ("Agentic-R's search agent (Search-R1 recipe) on the zoo's multi-role PPO base. "
                  "Deviations: the tiny world model chooses among templated searches and answers "
                  "(choice decoding) instead of writing free text; the reward is broadcast to every "
                  "turn, equal to the terminal reward's return at gamma = lambda = 1.")

    def __init__(self, *args: Any, prompt_template: str = SEARCH_R1_INSTRUCTION, max_turns: int = 4,
                 max_searches: int = 5, retriever_input: str = "q", **kwargs: Any) -> None:
        kwargs.setdefault("rollout", {"max_new_tokens": 64, "temperature": 1.0,
                                      "stop": ["</search>", "</answer>"]})
        kwargs.setdefault("kl", {"coef": 0.001, "kind": "k3", "in_reward": False})
        kwargs.setdefault("format_penalty", 0.0)
        super().__init__(*args, prompt_template=prompt_template, **kwargs)
        check_query_format(retriever_input)
        self.save_hyperparameters()

    @property
    def max_searches(self) -> int:
        return self.hparams.max_searches

    def tool(self) -> SearchTool:
        if self.env is None:
            raise RuntimeError("SearchAgentModule needs a search environment: set module.env or train with a "
                               "datamodule that has environment()")
        search = dict(self.hparams.search or {})
        return SearchTool(self.env, self.hparams.retriever_input, search.get("k", self.env.k))

    # -- hooks ---------------------------------------------------------------------------------
    def observation(self, sample: Mapping[str, Any], steps: Sequence[SearchStep]) -> str:
        lines = [self.hparams.prompt_template.format(question=sample["question"])]
        for step in steps:
            lines.append(f"{step.text} {SearchEnvironment.format(step.passages, 'information')}")
        return "\n".join(lines) + "\n"

    def candidates(self, sample: Mapping[str, Any], steps: Sequence[SearchStep], can_search: bool) -> list[str]:
        seen = list(dict.fromkeys(_ENTITY.findall(sample["question"]) +
                                  [e for s in steps for p in s.passages for e in _ENTITY.findall(p.text)]))
        options = [f"<answer> {e} </answer>" for e in seen if e not in sample["question"].split()]
        if can_search:
            options += [f"<search> {words} {e} </search>" for e in seen
                        for words in dict.fromkeys(r[4] for r in RELATIONS.values())]
        return options or ["<answer> </answer>"]

    def turn_call(self, sample: Mapping[str, Any], steps: Sequence[SearchStep], can_search: bool) -> Call:
        choice = self.hparams.decode_mode == "choice"
        return Call("agent", self.observation(sample, steps),
                    candidates=self.candidates(sample, steps, can_search) if choice else None,
                    stop=tuple(self.rollout_cfg.get("stop") or ()))

    def episode(self, sample: Mapping[str, Any], index: int):
        steps: list[SearchStep] = []
        stats = TrajectoryStats()
        tool = self.tool()
        prediction = ""
        for turn in range(self.hparams.max_turns):
            can_search = turn < self.hparams.max_turns - 1 and len(steps) < self.hparams.max_searches
            response = yield self.turn_call(sample, steps, can_search)
            stats.turns += 1
            query, answer = parse_turn(response.text)
            if answer is not None:
                prediction = answer
                break
            if query is None or not can_search:
                response.transition.valid = False
                break
            passages = tool.search(sample["question"], query, [s.query for s in steps], stats=stats)
            steps.append(SearchStep(query, passages, response.text))
        score = exact_match(prediction, sample["golden_answers"])
        return {"prediction": prediction, "stats": stats, "score": score, "steps": steps}

    def act(self, sample: Mapping[str, Any], steps: Sequence[SearchStep], searches_left: int) -> Turn:
        """One greedy turn (the ``SearchAgent`` protocol, for trajectories and GAC replay)."""
        texts, _ = self.generate_calls([self.turn_call(sample, steps, searches_left > 0)], evaluation=True,
                                       stream=0)
        query, answer = parse_turn(texts[0])
        if answer is None and (query is None or not searches_left):
            answer = ""
        return Turn(texts[0], query=query if answer is None else None, answer=answer)
