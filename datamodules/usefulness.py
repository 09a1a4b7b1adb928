"""Search-session logs with user usefulness labels for clicked documents (CLUE, arXiv 2506.08626).

One item per query: the information need (task), the query, the user's query satisfaction, and its
clicked documents sorted by click order, each with title, snippet, page text, SERP rank, click order,
dwell time (seconds), the user's usefulness label, and two precomputed strings: ``behaviour`` (the
CLUE behaviour sentence) and ``history`` (what the searcher had read before this click).

``source=synthetic`` generates the spec's log with a fixed seed: a latent usefulness u per click;
dwell time log-normal with a mean rising in u; SERP rank and click order weakly tied to u; a single
click more likely when u is high; page text sharing more topic words with the query as u grows;
satisfaction = round(clip(1 + 0.8 mean(u) + noise, 1, 5)). ``source=file`` reads the same fields
from a JSON-lines log, one query per line.

``UsefulnessDataModule`` serves the queries for CLUE (test/predict); ``SatisfactionDataModule``
turns them into query features (from gold, CLUE or no labels) and satisfaction targets for
``SatisfactionPredictor``, split by query into train/test (50/50 as the reference ML script).
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.readers import DataFormatError, iter_jsonl

SOURCES = ("synthetic", "file")
SPLITS = ("all", "train", "test")
LABEL_SOURCES = ("gold", "clue")
QUERY_KEYS = ("qid", "query", "docs")
DOC_KEYS = ("doc_id", "text", "rank", "click_order", "dwell", "usefulness")

# Topic words (the query and useful pages draw on them) and filler words (everything else on a page).
SYNTHETIC_TOPICS = {
    "solar panels for a house": ["solar", "panel", "energy", "battery", "inverter", "roof", "install", "cost",
                                 "sunlight", "efficiency"],
    "roasting coffee at home": ["coffee", "bean", "roast", "grind", "brew", "espresso", "aroma", "arabica",
                                "temperature", "flavor"],
    "training for a marathon": ["marathon", "running", "mile", "pace", "stretch", "shoe", "race", "endurance",
                                "hydration", "injury"],
    "learning python programming": ["python", "function", "loop", "variable", "syntax", "library", "code",
                                     "debug", "list", "module"],
    "the history of ancient rome": ["rome", "emperor", "empire", "legion", "senate", "caesar", "republic",
                                    "gladiator", "forum", "aqueduct"],
    "growing tomatoes in a garden": ["tomato", "garden", "soil", "seed", "water", "fertilizer", "plant",
                                     "harvest", "compost", "prune"],
    "booking a cheap flight": ["flight", "airline", "ticket", "airport", "luggage", "seat", "booking", "fare",
                               "passport", "delay"],
    "a diet for diabetes": ["diabetes", "sugar", "insulin", "diet", "carbohydrate", "glucose", "meal", "fiber",
                            "exercise", "doctor"],
    "playing guitar chords": ["guitar", "chord", "string", "fret", "strum", "tune", "melody", "finger", "song",
                              "practice"],
    "comparing mortgage rates": ["mortgage", "loan", "interest", "rate", "bank", "house", "payment", "credit",
                                 "deposit", "refinance"],
}
FILLER_WORDS = ["page", "website", "click", "news", "advert", "login", "cookie", "menu", "contact", "share",
                "video", "photo", "review", "forum", "weather", "celebrity", "sports", "music", "movie", "recipe",
                "shop", "sale", "comment", "subscribe", "home", "blog", "link", "today", "free", "offer"]


def synthetic_words() -> list[str]:
    """Every word the generator writes (the tiny judge's tokenizer knows them whole)."""
    words = [w for name, topic in SYNTHETIC_TOPICS.items() for w in name.split() + topic]
    return list(dict.fromkeys(words + FILLER_WORDS))


# -- behaviour and history sentences (the spec's 5-level wording) --------------------------------------
def behaviour_sentence(docs: list[dict[str, Any]], j: int) -> str:
    """Click order, SERP rank, the query's other clicks (or that this was the only one), dwell times."""
    doc = docs[j]
    n = len(docs)
    ranks = [d["rank"] for d in docs]
    mean_dwell = sum(d["dwell"] for d in docs) / n
    text = f"It was click {doc['click_order']} of this query, at rank {doc['rank']} of the results page. "
    if n == 1:
        text += "It was the only click: the searcher finished the search after this one document. "
    else:
        text += (f"The searcher clicked {n} documents, at ranks {', '.join(str(r) for r in ranks)}, "
                 f"down to rank {max(ranks)}. ")
    return text + (f"The searcher read it for {math.ceil(doc['dwell'])} seconds; the average over the clicked "
                   f"documents of this query is {math.ceil(mean_dwell)} seconds.")


def history_sentence(docs: list[dict[str, Any]], j: int) -> str:
    """What the searcher had already obtained before this click: titles + snippets of earlier clicks."""
    earlier = [f"{d.get('title', '')}: {d.get('snippet', '')}".strip(": ") for d in docs[:j]]
    return "Before viewing it the searcher had read: " + ("; ".join(earlier) if earlier else "nothing") + "."


def prepare_query(raw: dict[str, Any]) -> dict[str, Any]:
    """Clicked documents in click order, with behaviour and history sentences."""
    docs = sorted((dict(d) for d in raw["docs"]), key=lambda d: int(d["click_order"]))
    for d in docs:
        d.setdefault("title", "")
        d.setdefault("snippet", "")
    for j, d in enumerate(docs):
        d["behaviour"] = behaviour_sentence(docs, j)
        d["history"] = history_sentence(docs, j)
    return {"qid": str(raw["qid"]), "task": raw.get("task") or raw["query"], "query": raw["query"],
            "satisfaction": raw.get("satisfaction"), "docs": docs}


# -- sources -------------------------------------------------------------------------------------------
def generate_sessions(num_queries: int = 40, levels: list[int] | None = None, max_clicks: int = 5,
                      serp_size: int = 10, satisfaction_noise: float = 0.5, seed: int = 0) -> list[dict[str, Any]]:
    """The spec's synthetic session log (prepared queries, see ``prepare_query``)."""
    levels = sorted(levels or [0, 1, 2, 3, 4])
    top = len(levels) - 1
    rng = random.Random(seed)
    names = list(SYNTHETIC_TOPICS)
    queries = []
    for q in range(num_queries):
        name = names[q % len(names)] if q < len(names) else rng.choice(names)
        topic = SYNTHETIC_TOPICS[name]
        query_words = rng.sample(topic, 3)
        n = rng.choices(range(1, max_clicks + 1), weights=[3, 3, 2, 2, 1][:max_clicks] + [1] * (max_clicks - 5))[0]
        # A lone click is more often a useful one (the searcher stopped because it satisfied them).
        weights = [1, 1, 2, 3, 4] if n == 1 else [3, 3, 3, 2, 2]
        grades = [rng.choices(range(top + 1), weights=_spread(weights, top + 1))[0] for _ in range(n)]
        # Weak position effects: better documents tend to sit higher and be clicked earlier.
        ranks = sorted(rng.sample(range(1, serp_size + 1), n))
        by_merit = sorted(range(n), key=lambda i: -(grades[i] / max(top, 1) + rng.gauss(0, 0.6)))
        rank_of = {i: ranks[pos] for pos, i in enumerate(by_merit)}
        click_seq = sorted(range(n), key=lambda i: rank_of[i] + rng.gauss(0, 1.5))
        docs = []
        for order, i in enumerate(click_seq, start=1):
            u = grades[i]
            share = u / max(top, 1)
            dwell = math.exp(rng.gauss(math.log(8.0) + 1.8 * share, 0.6))
            docs.append({"doc_id": f"q{q}d{i}", "rank": rank_of[i], "click_order": order, "dwell": round(dwell, 1),
                         "usefulness": levels[u], **_page(rng, topic, query_words, share)})
        mean_u = sum(levels.index(d["usefulness"]) for d in docs) / n * 4.0 / max(top, 1)
        satisfaction = int(round(min(max(1 + 0.8 * mean_u + rng.gauss(0, satisfaction_noise), 1), 5)))
        queries.append(prepare_query({"qid": f"q{q}", "task": f"The searcher wants to learn about {name}.",
                                      "query": " ".join(query_words), "satisfaction": satisfaction, "docs": docs}))
    return queries


def _spread(weights: list[int], size: int) -> list[int]:
    """Five-level weights resampled onto ``size`` levels."""
    return [weights[round(i * 4 / max(size - 1, 1))] for i in range(size)]


def _page(rng: random.Random, topic: list[str], query_words: list[str], share: float) -> dict[str, str]:
    """Title, snippet and text whose topic-word share grows with usefulness."""
    def words(count: int, p_topic: float, must: list[str]) -> str:
        out = [w for w in must if rng.random() < 0.5 + 0.5 * share]
        while len(out) < count:
            out.append(rng.choice(topic) if rng.random() < p_topic else rng.choice(FILLER_WORDS))
        rng.shuffle(out)
        return " ".join(out)

    p_topic = 0.1 + 0.7 * share
    return {"title": words(4, p_topic, query_words[:1]), "snippet": words(10, p_topic, query_words[1:]),
            "text": words(24, p_topic, query_words)}


def read_sessions(path: str | Path) -> list[dict[str, Any]]:
    """A JSON-lines session log: one query per line with ``qid``, ``query``, ``docs`` (each with
    ``doc_id``, ``text``, ``rank``, ``click_order``, ``dwell`` in seconds, ``usefulness``; optional
    ``title``, ``snippet``) and optional ``task`` and ``satisfaction``."""
    queries = []
    for line_no, obj in iter_jsonl(path):
        missing = [k for k in QUERY_KEYS if k not in obj]
        if missing:
            raise DataFormatError(path, line_no, f"missing keys {missing}")
        if not isinstance(obj["docs"], list) or not obj["docs"]:
            raise DataFormatError(path, line_no, "key 'docs' must be a non-empty list of clicked documents")
        for i, doc in enumerate(obj["docs"]):
            lacking = [k for k in DOC_KEYS if not isinstance(doc, dict) or k not in doc]
            if lacking:
                raise DataFormatError(path, line_no, f"docs[{i}] lacks {lacking}")
            try:
                doc["rank"], doc["click_order"] = int(doc["rank"]), int(doc["click_order"])
                doc["dwell"], doc["usefulness"] = float(doc["dwell"]), int(doc["usefulness"])
            except (TypeError, ValueError):
                raise DataFormatError(path, line_no, f"docs[{i}]: rank, click_order, usefulness must be integers "
                                                     "and dwell a number of seconds") from None
        queries.append(prepare_query(obj))
    return queries


def split_queries(queries: list[dict[str, Any]], split: str, train_fraction: float, seed: int) -> list[dict[str, Any]]:
    """A seeded split by query (every click of a query lands on the same side)."""
    if split not in SPLITS:
        raise ValueError(f"unknown data.split '{split}'; choose one of {', '.join(SPLITS)}")
    if split == "all":
        return list(queries)
    order = list(range(len(queries)))
    random.Random(f"split:{seed}").shuffle(order)
    cut = int(round(train_fraction * len(queries)))
    chosen = sorted(order[:cut] if split == "train" else order[cut:])
    return [queries[i] for i in chosen]


def load_sessions(source: str, path: str | None, levels: list[int], synthetic: dict | None, seed: int,
                  max_queries: int | None = None) -> list[dict[str, Any]]:
    if source not in SOURCES:
        raise ValueError(f"unknown data.source '{source}'; choose one of {', '.join(SOURCES)}")
    if source == "file":
        if not path:
            raise ValueError("data.source=file needs data.path (a JSON-lines session log)")
        queries = read_sessions(path)
        bad = sorted({d["usefulness"] for q in queries for d in q["docs"]} - set(levels))
        if bad:
            raise ValueError(f"{path}: usefulness labels {bad} are outside data.levels={levels}")
    else:
        queries = generate_sessions(levels=levels, seed=seed, **(synthetic or {}))
    return queries[:max_queries] if max_queries else queries


def collate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rows


class UsefulnessDataModule(L.LightningDataModule):
    """Test/predict only (CLUE is training-free). Batches are lists of prepared query dicts."""

    def __init__(self, source: str = "synthetic", path: str | None = None, levels: list[int] | None = None,
                 split: str = "all", train_fraction: float = 0.5, max_queries: int | None = None,
                 batch_size: int = 8, synthetic: dict | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.levels = sorted(levels or [0, 1, 2, 3, 4])
        self.queries: list[dict[str, Any]] = []

    def setup(self, stage: str | None = None) -> None:
        if self.queries:
            return
        hp = self.hparams
        queries = load_sessions(hp.source, hp.path, self.levels, hp.synthetic, hp.seed)
        self.queries = split_queries(queries, hp.split, hp.train_fraction, hp.seed)[:hp.max_queries or None]

    def _loader(self) -> DataLoader:
        return DataLoader(self.queries, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class SatisfactionDataModule(L.LightningDataModule):
    """Query features and satisfaction for ``SatisfactionPredictor``.

    ``label_source``: ``gold`` (the users' usefulness labels: the oracle) or ``clue`` (labels from a
    ``CLUEModule`` built from the ``clue`` dict of its arguments, run over every query). Batches are
    dicts of ``label_features`` [B, 4], ``behaviour_features`` [B, 5] (both standardised with the
    training side's mean and std) and ``satisfaction`` [B].
    """

    def __init__(self, source: str = "synthetic", path: str | None = None, levels: list[int] | None = None,
                 label_source: str = "gold", clue: dict | None = None, train_fraction: float = 0.5,
                 max_queries: int | None = None, batch_size: int = 32, synthetic: dict | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if label_source not in LABEL_SOURCES:
            raise ValueError(f"unknown data.label_source '{label_source}'; choose one of {', '.join(LABEL_SOURCES)}")
        self.save_hyperparameters()
        self.levels = sorted(levels or [0, 1, 2, 3, 4])
        self.sets: dict[str, dict[str, torch.Tensor]] = {}

    def labels_for(self, queries: list[dict[str, Any]]) -> list[list[int]]:
        """Usefulness labels per query (per clicked document); override to bring labels from elsewhere."""
        if self.hparams.label_source == "gold":
            return [[d["usefulness"] for d in q["docs"]] for q in queries]
        from zoo.usefulness_labels.module import CLUEModule

        judge = CLUEModule(**{"levels": self.levels, **(self.hparams.clue or {})})
        return judge.label(queries)["labels"]

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        from zoo.usefulness_labels.satisfaction import query_features

        hp = self.hparams
        queries = load_sessions(hp.source, hp.path, self.levels, hp.synthetic, hp.seed, hp.max_queries)
        missing = [q["qid"] for q in queries if q["satisfaction"] is None]
        if missing:
            raise ValueError(f"queries {missing[:5]} have no 'satisfaction' to predict")
        labels = dict(zip((q["qid"] for q in queries), self.labels_for(queries)))
        raw = {}
        for split in ("train", "test"):
            part = split_queries(queries, split, hp.train_fraction, hp.seed)
            feats = [query_features(labels[q["qid"]], q["docs"]) for q in part]
            raw[split] = {"label_features": torch.tensor([f[0] for f in feats], dtype=torch.float32),
                          "behaviour_features": torch.tensor([f[1] for f in feats], dtype=torch.float32),
                          "satisfaction": torch.tensor([float(q["satisfaction"]) for q in part])}
        for key in ("label_features", "behaviour_features"):
            mean, std = raw["train"][key].mean(0), raw["train"][key].std(0).clamp_min(1e-6)
            for split in raw:
                raw[split][key] = (raw[split][key] - mean) / std
        self.sets = raw

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.sets[split]
        rows = [{k: v[i] for k, v in data.items()} for i in range(len(data["satisfaction"]))]
        return DataLoader(rows, batch_size=self.hparams.batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(self.hparams.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
