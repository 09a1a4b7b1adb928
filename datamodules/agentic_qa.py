"""Question batches for agentic search (JADE, M-ASK, Agentic-R) and the corpus their search tool covers.

Sources:
- ``world``: the synthetic knowledge base of ``zoo.blocks.world`` (the embedded default);
- ``hotpotqa``: the HotpotQA distractor format (each question with its ten paragraphs). The corpus is
  either the union of every paragraph in the file (``corpus_scope=union``) or each question's own ten
  (``per_question``: every sample carries ``within``, the ids its searches are restricted to);
- ``nq_open``: NQ-open answers ({"question", "answer": [...]}); it ships no passages, so the search
  corpus comes from ``corpus_path`` (JSONL of {"id", "title", "text"}) or another source's corpus.

A batch is a list of samples ``{"qid", "question", "golden_answers", "source", ...}``: prompts are
built inside each agent's rollout. ``environment()`` builds the ``SearchEnvironment`` over the corpus.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from datamodules.readers import DataFormatError, iter_jsonl
from zoo.blocks.search_env import SearchEnvironment, passages_from_records
from zoo.blocks.world import SyntheticWorld

SOURCES = ("world", "hotpotqa", "nq_open")
SCOPES = ("union", "per_question")

Sample = dict[str, Any]


def _field(obj: dict[str, Any], key: str, path: Path, line: int) -> Any:
    if key not in obj:
        raise DataFormatError(path, line, f"missing key '{key}'")
    return obj[key]


def read_hotpotqa(path: str | Path) -> tuple[list[Sample], list[dict[str, str]]]:
    """Questions and the union of their paragraphs (one per distinct title) from a HotpotQA JSONL file.

    Each sample's ``within`` lists its own paragraphs' ids and ``support`` the gold (supporting) ones.
    """
    path = Path(path)
    samples: list[Sample] = []
    paragraphs: dict[str, dict[str, str]] = {}
    for line, row in iter_jsonl(path):
        context = _field(row, "context", path, line)
        titles, sentences = context.get("title"), context.get("sentences")
        if not isinstance(titles, list) or not isinstance(sentences, list) or len(titles) != len(sentences):
            raise DataFormatError(path, line, "context needs equal-length 'title' and 'sentences' lists")
        own = []
        for title, sents in zip(titles, sentences):
            text = "".join(sents).strip()
            paragraphs.setdefault(title, {"id": title, "title": title, "text": text})
            own.append(title)
        support = list(dict.fromkeys(_field(row, "supporting_facts", path, line).get("title", [])))
        answer = _field(row, "answer", path, line)
        samples.append({"qid": str(_field(row, "id", path, line)), "question": _field(row, "question", path, line),
                        "golden_answers": [answer], "source": "hotpotqa", "type": row.get("type", ""),
                        "within": own, "support": support})
    return samples, list(paragraphs.values())


def read_nq_open(path: str | Path) -> list[Sample]:
    path = Path(path)
    samples = []
    for line, row in iter_jsonl(path):
        answers = _field(row, "answer", path, line)
        if isinstance(answers, str):
            answers = [answers]
        if not answers:
            raise DataFormatError(path, line, "'answer' is empty")
        samples.append({"qid": f"nq-{line}", "question": _field(row, "question", path, line),
                        "golden_answers": list(answers), "source": "nq_open"})
    return samples


def read_passages(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    rows = []
    for line, row in iter_jsonl(path):
        text = row.get("text", row.get("contents"))
        if text is None:
            raise DataFormatError(path, line, "a passage needs 'text' (or 'contents')")
        rows.append({"id": str(_field(row, "id", path, line)), "title": row.get("title", ""), "text": text})
    return rows


class AgenticQADataModule(L.LightningDataModule):
    """Train / validation / test question batches plus the search corpus.

    ``world`` splits its generated questions ``train_fraction`` / rest (the rest halved into
    validation and test); file sources split the file the same way (``eval_fraction`` held apart,
    half validation, half test). ``max_questions`` caps each split.
    """

    def __init__(self, source: str = "world", path: str | None = None, corpus_path: str | None = None,
                 corpus_scope: str = "union", world: dict[str, Any] | None = None, hops: list[int] | None = None,
                 train_fraction: float = 0.7, max_questions: int | None = None, max_eval_questions: int | None = None,
                 batch_size: int = 8, eval_batch_size: int = 32, train_batches: int | None = None,
                 retriever: str = "bow", k: int = 5, query_format: str = "{query}", seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown agentic QA source '{source}'; choose one of {SOURCES}")
        if corpus_scope not in SCOPES:
            raise ValueError(f"corpus_scope must be one of {SCOPES}, not '{corpus_scope}'")
        if source != "world" and not path:
            raise ValueError(f"data.path is required for source '{source}'")
        self.save_hyperparameters()
        self.world: SyntheticWorld | None = None
        self._splits: dict[str, list[Sample]] | None = None
        self._corpus: list[dict[str, str]] | None = None

    # -- data --------------------------------------------------------------------------------
    def load(self) -> tuple[dict[str, list[Sample]], list[dict[str, str]]]:
        if self._splits is not None and self._corpus is not None:
            return self._splits, self._corpus
        h = self.hparams
        if h.source == "world":
            self.world = SyntheticWorld(**dict(h.world or {}))
            samples = [q.as_sample() for q in self.world.questions]
            if h.hops:
                samples = [s for s in samples if s["hops"] in h.hops]
            ids, titles, texts = self.world.corpus()
            corpus = [{"id": i, "title": t, "text": x} for i, t, x in zip(ids, titles, texts)]
        elif h.source == "hotpotqa":
            path = Path(h.path)
            if not path.exists():
                raise FileNotFoundError(f"HotpotQA file not found: {path}")
            samples, corpus = read_hotpotqa(path)
        else:
            path = Path(h.path)
            if not path.exists():
                raise FileNotFoundError(f"NQ-open file not found: {path}")
            samples = read_nq_open(path)
            corpus = []
        if h.corpus_path:
            if not Path(h.corpus_path).exists():
                raise FileNotFoundError(f"corpus file not found: {h.corpus_path}")
            corpus = read_passages(h.corpus_path)
        if not corpus:
            raise ValueError(f"source '{h.source}' has no passages: set data.corpus_path to a JSONL of "
                             "{id, title, text} passages for the search tool")
        if h.corpus_scope == "union":
            samples = [{k: v for k, v in s.items() if k != "within"} for s in samples]
        elif h.source != "hotpotqa":
            raise ValueError("corpus_scope=per_question needs the hotpotqa source (its questions carry paragraphs)")
        self._splits = self._split(samples)
        self._corpus = corpus
        return self._splits, corpus

    def _split(self, samples: list[Sample]) -> dict[str, list[Sample]]:
        h = self.hparams
        order = list(range(len(samples)))
        random.Random(h.seed).shuffle(order)
        cut = round(len(order) * h.train_fraction)
        rest = order[cut:]
        half = len(rest) // 2
        splits = {"train": [samples[i] for i in order[:cut]], "val": [samples[i] for i in rest[:half]],
                  "test": [samples[i] for i in rest[half:]]}
        if h.max_questions:
            splits["train"] = splits["train"][:h.max_questions]
        if h.max_eval_questions:
            splits["val"] = splits["val"][:h.max_eval_questions]
            splits["test"] = splits["test"][:h.max_eval_questions]
        return splits

    def samples(self, split: str) -> list[Sample]:
        return self.load()[0][split]

    def environment(self, k: int | None = None, retriever: Any = None, **kwargs: Any) -> SearchEnvironment:
        """The search tool over this source's corpus (hashed bag-of-words or BM25 unless given a Retriever)."""
        _, corpus = self.load()
        return SearchEnvironment(*passages_from_records(corpus), retriever=retriever or self.hparams.retriever,
                                 k=k or self.hparams.k, query_format=kwargs.pop("query_format", self.hparams.query_format),
                                 **kwargs)

    # -- loaders -----------------------------------------------------------------------------
    def _loader(self, rows: list[Sample], batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=list,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        rows = self.samples("train")
        if self.hparams.train_batches:
            need = self.hparams.train_batches * self.hparams.batch_size
            rng = random.Random(self.hparams.seed + 1)
            pool: list[Sample] = []
            while len(pool) < need:          # more steps than questions: fresh shuffles, cycled
                chunk = list(rows)
                rng.shuffle(chunk)
                pool += chunk
            return self._loader(pool[:need], self.hparams.batch_size, shuffle=False)
        return self._loader(rows, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.samples("val"), self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.samples("test"), self.hparams.eval_batch_size, shuffle=False)
