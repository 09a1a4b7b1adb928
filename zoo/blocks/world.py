"""A synthetic knowledge base generated in code: the corpus and questions behind the agentic-search defaults.

People, cities, countries and companies are linked by four relations, each stated once as a
one-sentence passage ("Entity17 was born in City4."). One-hop questions ask for one relation;
two-hop questions chain two ("In which country was Entity17 born?" needs the birth city, then its
country). Distractor passages share the question's surface words without answering it
("Entity17 visited City9."), so lexical similarity and usefulness differ.

Names are drawn from fixed pools (``MAX_*``), so one word-level tokenizer (``WORLD_WORDS``) knows
every world this module can generate.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

MAX_PEOPLE, MAX_CITIES, MAX_COUNTRIES, MAX_COMPANIES = 200, 60, 20, 40

# relation -> (subject kind, object kind, passage template, one-hop question template, search words)
RELATIONS: dict[str, tuple[str, str, str, str, str]] = {
    "born_in": ("person", "city", "{s} was born in {o} .", "Where was {s} born ?", "born"),
    "works_for": ("person", "company", "{s} works for {o} .", "Which company does {s} work for ?", "works for"),
    "located_in": ("city", "country", "{s} is located in {o} .", "In which country is {s} located ?", "located in"),
    "based_in": ("company", "city", "{s} is headquartered in {o} .", "Where is {s} headquartered ?", "headquartered"),
}
# Two-hop chains: (first relation, second relation, question template over the first subject).
CHAINS: dict[str, tuple[str, str, str]] = {
    "birth_country": ("born_in", "located_in", "In which country was {s} born ?"),
    "employer_city": ("works_for", "based_in", "In which city is the company of {s} headquartered ?"),
}
DISTRACTORS = ("{s} visited {o} .", "{s} once wrote about {o} .", "{s} never lived in {o} .")

_PREFIX = {"person": "Entity", "city": "City", "country": "Country", "company": "Company"}
_POOL = {"person": MAX_PEOPLE, "city": MAX_CITIES, "country": MAX_COUNTRIES, "company": MAX_COMPANIES}


def _template_words() -> list[str]:
    words: list[str] = []
    for _, _, passage, question, search in RELATIONS.values():
        words += passage.split() + question.split() + search.split()
    for _, _, question in CHAINS.values():
        words += question.split()
    for template in DISTRACTORS:
        words += template.split()
    return [w for w in words if not w.startswith("{")]


# Words agent prompts use; anything else a tiny word tokenizer maps to [UNK].
PROMPT_WORDS = """question questions answer answers sub sub-question document documents doc docs query queries search
searched evidence summary knowledge state plan planner workflow module modules select selected rewrite rewritten
decompose decomposition retrieve retrieved retrieval generate final output only strictly inside tag tags no useful
information not sure unknown unkown yes no none end update add step steps trajectory history context the a an of in
to for is was and or with by on from what which where who when how many does did do are this that these given
current main original new previous next then first last please write short reasoning think passage rate score
relevant relevance | : ; , . ? ! ( ) [ ] [SEP] - _ = ' " / # 0 1 2 3 4 5 6 7 8 9 10""".split()  # noqa: SIM905
PROMPT_WORDS += [w.capitalize() for w in PROMPT_WORDS if w.isalpha()]

AGENT_TAGS = [f"<{t}>" for t in (
    "workflow", "query", "id", "answer", "search", "end", "evidence", "Update", "Add", "final_answer", "information",
    "think", "sub-answer")] + [f"</{t}>" for t in (
    "workflow", "query", "id", "answer", "search", "evidence", "Update", "Add", "final_answer", "information",
    "think", "sub-answer")] + [f"<q{i}>" for i in range(1, 8)] + [f"</q{i}>" for i in range(1, 8)] + [
    f"<a{i}>" for i in range(1, 8)] + [f"</a{i}>" for i in range(1, 8)]
AGENT_WORDS = ["QR", "QDS", "QDP", "R", "DS", "AG", "AS"] + [f"Document{i}" for i in range(10)] + [
    f"Doc{i}" for i in range(1, 11)] + [f"t{i}" for i in range(1, 11)]

WORLD_WORDS: list[str] = list(dict.fromkeys(
    [f"{_PREFIX[k]}{i}" for k in _PREFIX for i in range(_POOL[k])] + _template_words() + PROMPT_WORDS
    + AGENT_TAGS + AGENT_WORDS))


@dataclass
class WorldQuestion:
    qid: str
    question: str
    answer: str
    hops: int
    subquestions: list[tuple[str, str]]        # the chain of one-hop questions and their answers
    subject: str
    relations: list[str]
    support: list[str]                         # ids of the passages that answer it, in order

    def as_sample(self) -> dict[str, Any]:
        return {"qid": self.qid, "question": self.question, "golden_answers": [self.answer], "source": "world",
                "hops": self.hops, "subquestions": [list(p) for p in self.subquestions], "support": self.support}


@dataclass
class SyntheticWorld:
    """The generated world: ``passages`` (id -> {title, text}) and ``questions``.

    Every entity of a kind takes part in each relation of that kind as subject exactly once,
    so every question has one answer.
    """

    people: int = 60
    cities: int = 20
    countries: int = 6
    companies: int = 12
    distractors_per_person: int = 1
    seed: int = 0
    facts: dict[tuple[str, str], str] = field(default_factory=dict, init=False)
    passages: dict[str, dict[str, str]] = field(default_factory=dict, init=False)
    questions: list[WorldQuestion] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        sizes = {"person": self.people, "city": self.cities, "country": self.countries, "company": self.companies}
        for kind, size in sizes.items():
            if not 1 <= size <= _POOL[kind]:
                raise ValueError(f"a world has 1..{_POOL[kind]} {kind} entities (the word tokenizer's pool), "
                                 f"not {size}")
        rng = random.Random(self.seed)
        names = {kind: [f"{_PREFIX[kind]}{i}" for i in rng.sample(range(_POOL[kind]), size)]
                 for kind, size in sizes.items()}
        for relation, (subject_kind, object_kind, template, _, _) in RELATIONS.items():
            for subject in names[subject_kind]:
                obj = rng.choice(names[object_kind])
                self.facts[(subject, relation)] = obj
                self._add_passage(f"{relation}:{subject}", subject, template.format(s=subject, o=obj))
        for person in names["person"]:
            wrong = [c for c in names["city"] if c != self.facts[(person, "born_in")]]
            for k in range(self.distractors_per_person):
                text = DISTRACTORS[k % len(DISTRACTORS)].format(s=person, o=rng.choice(wrong))
                self._add_passage(f"distractor{k}:{person}", person, text)
        self._make_questions(names, rng)

    def _add_passage(self, pid: str, title: str, text: str) -> None:
        self.passages[pid] = {"title": title, "text": text}

    def _make_questions(self, names: dict[str, list[str]], rng: random.Random) -> None:
        for relation, (subject_kind, _, _, question, _) in RELATIONS.items():
            for subject in names[subject_kind]:
                answer = self.facts[(subject, relation)]
                text = question.format(s=subject)
                self.questions.append(WorldQuestion("", text, answer, 1, [(text, answer)], subject, [relation],
                                                    [f"{relation}:{subject}"]))
        for first, second, question in CHAINS.values():
            for subject in names[RELATIONS[first][0]]:
                middle = self.facts[(subject, first)]
                answer = self.facts[(middle, second)]
                steps = [(RELATIONS[first][3].format(s=subject), middle),
                         (RELATIONS[second][3].format(s=middle), answer)]
                self.questions.append(WorldQuestion("", question.format(s=subject), answer, 2, steps, subject,
                                                    [first, second], [f"{first}:{subject}", f"{second}:{middle}"]))
        rng.shuffle(self.questions)
        for i, q in enumerate(self.questions):
            q.qid = f"world-{i}"

    def search_words(self, relation: str) -> str:
        return RELATIONS[relation][4]

    @property
    def entities(self) -> list[str]:
        return sorted({s for s, _ in self.facts} | set(self.facts.values()))

    def corpus(self) -> tuple[list[str], list[str], list[str]]:
        """(ids, titles, texts) of every passage, in a fixed order."""
        ids = list(self.passages)
        return ids, [self.passages[i]["title"] for i in ids], [self.passages[i]["text"] for i in ids]
