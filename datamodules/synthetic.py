"""A generated retrieval collection: topics of invented keywords inside super-topics.

Each query is written from one target document (relevance 2); other documents of the same
topic that share at least two query words are relevant 1. Documents of sibling topics in
the same super-topic share vocabulary with the query's topic and make hard negatives.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from datamodules.readers import RetrievalData

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_FILLER = ("the of and to in is for on with that by as are this from be or an at which was "
           "results study effect method analysis using based new data model high low between "
           "during after under over both these their may also can into within").split()


@dataclass(frozen=True)
class SyntheticSpec:
    super_topics: int = 10
    topics_per_super: int = 5
    docs_per_topic: int = 20
    queries_per_topic: int = 4
    topic_words: int = 15
    super_words: int = 12
    seed: int = 0


def _word(rng: random.Random, used: set[str]) -> str:
    while True:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
        if word not in used:
            used.add(word)
            return word


def generate(spec: SyntheticSpec) -> tuple[RetrievalData, dict[str, int]]:
    """The collection, and each query's topic id (for splits and teachers)."""
    rng = random.Random(spec.seed)
    used: set[str] = set(_FILLER)
    corpus: dict[str, dict[str, str]] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    query_topic: dict[str, int] = {}
    topic = 0
    for s in range(spec.super_topics):
        shared = [_word(rng, used) for _ in range(spec.super_words)]
        for _ in range(spec.topics_per_super):
            keywords = [_word(rng, used) for _ in range(spec.topic_words)]
            weights = [1.0 / (rank + 1) for rank in range(len(keywords))]  # Zipf-like
            doc_words: dict[str, set[str]] = {}
            for d in range(spec.docs_per_topic):
                doc_id = f"s{s}t{topic}d{d}"
                own = rng.choices(keywords, weights=weights, k=rng.randint(5, 9))
                # A few rare keywords make each document findable by its own query.
                own += rng.sample(keywords[5:], 3)
                words = own + rng.choices(shared, k=rng.randint(4, 6)) + rng.choices(_FILLER, k=rng.randint(12, 20))
                rng.shuffle(words)
                corpus[doc_id] = {"title": " ".join(rng.sample(own, 2)), "text": " ".join(words)}
                doc_words[doc_id] = set(own)
            targets = rng.sample(sorted(doc_words), spec.queries_per_topic)
            for qi, target in enumerate(targets):
                qid = f"q{topic}_{qi}"
                words = rng.sample(sorted(doc_words[target]), min(3, len(doc_words[target])))
                queries[qid] = " ".join(words + rng.sample(shared, 1))
                rels = {target: 2}
                for doc_id, vocab in doc_words.items():
                    if doc_id != target and len(vocab & set(words)) >= 2:
                        rels[doc_id] = 1
                qrels[qid] = rels
                query_topic[qid] = topic
            topic += 1
    return RetrievalData(corpus=corpus, queries=queries, qrels=qrels, name="synthetic"), query_topic

