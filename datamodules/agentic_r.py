"""Agentic-R retriever training data: utility-labelled groups plus the corpus, and the agent's test questions.

Groups are JSONL rows ``{dataset, query_id, question, round_index, history_queries, query_text,
passage_ids[G], scores[G]}`` (positive first), as ``zoo.agentic_r.labeling`` writes them; the corpus
is JSONL ``{id, contents}`` with contents = "title\\ntext" (FlashRAG / tevatron) or ``{id, title, text}``.

Without ``groups_path`` the groups are built here, on the synthetic world (a few seconds): the
scripted agent searches the world's training questions through the bag-of-words retriever (the
E5 stand-in, iteration 0), and the heuristic judge plus GAC replay label its searches.
Validation holds out ``val_fraction`` of the questions' groups; the test split is questions the
groups never came from, which the module answers end to end through its own index.

A batch: ``q_input_ids [B, Lq]``, ``q_attention_mask``, ``p_input_ids [B*G, Lp]``,
``p_attention_mask`` and, with ``llm_scores``, ``llm_scores [B, G]``.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.agentic_qa import AgenticQADataModule
from datamodules.readers import DataFormatError, iter_jsonl
from zoo.agentic_r.module import format_passage, format_query

GROUP_KEYS = ("query_id", "question", "query_text", "passage_ids")
DEFAULT_BUILD = {"retriever": "bow", "query_format": "q", "k": 3, "candidates": 20, "lr_batch_size": 10,
                 "lr_threshold": 0.6, "max_positives": 3, "max_round": 4, "selection": "lexicographic",
                 "use_sub_answers": True, "agent": {"max_searches": 5, "query_style": "relation"}}
DEFAULT_QUESTIONS = {"source": "world", "world": {"distractors_per_person": 3}, "train_fraction": 0.7}


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a backbone preset or Transformers folder / id (the model's own)."""
    from zoo.backbones import TINY_PRESETS, build_backbone, resolve_path

    if name in TINY_PRESETS:
        return build_backbone(name)[1]     # tiny presets build their tokenizer in code; the model is small
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_path(name))


def read_groups(path: str | Path, group_size: int) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Agentic-R groups file not found: {path}")
    groups = []
    for line, row in iter_jsonl(path):
        for key in GROUP_KEYS:
            if key not in row:
                raise DataFormatError(path, line, f"missing required key {key!r}")
        if len(row["passage_ids"]) < group_size:
            raise DataFormatError(path, line, f"{len(row['passage_ids'])} passages; the group size is {group_size}")
        groups.append(row)
    return groups


def read_corpus(path: str | Path) -> list[dict[str, str]]:
    """{id, title, text} rows from {id, contents="title\\ntext"} or {id, title, text} JSONL."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Agentic-R corpus file not found: {path}")
    rows = []
    for line, row in iter_jsonl(path):
        if "id" not in row:
            raise DataFormatError(path, line, "missing required key 'id'")
        if "contents" in row:
            title, _, text = str(row["contents"]).partition("\n")
            if not text:
                title, text = "", title
        elif "text" in row:
            title, text = row.get("title", ""), row["text"]
        else:
            raise DataFormatError(path, line, "a passage needs 'contents' or 'text'")
        rows.append({"id": str(row["id"]), "title": title, "text": text})
    return rows


class GroupCollator:
    """Groups -> token tensors: queries as prefix + "Q [SEP] q", passages as prefix + "title text"."""

    def __init__(self, tokenizer: Any, passages: Mapping[str, Mapping[str, str]], group_size: int,
                 query_format: str = "Q+q", query_prefix: str = "query: ", passage_prefix: str = "passage: ",
                 max_query_length: int = 64, max_passage_length: int = 128, llm_scores: bool = False) -> None:
        self.tokenizer, self.passages, self.group_size = tokenizer, passages, group_size
        self.query_format, self.query_prefix, self.passage_prefix = query_format, query_prefix, passage_prefix
        self.max_query_length, self.max_passage_length = max_query_length, max_passage_length
        self.llm_scores = llm_scores

    def query_text(self, group: Mapping[str, Any]) -> str:
        return format_query(group["question"], group["query_text"], group.get("history_queries") or (),
                            self.query_format, self.query_prefix)

    def passage_texts(self, group: Mapping[str, Any]) -> list[str]:
        texts = []
        for pid in group["passage_ids"][:self.group_size]:
            if pid not in self.passages:
                raise KeyError(f"group {group['query_id']}: passage '{pid}' is not in the corpus")
            passage = self.passages[pid]
            texts.append(format_passage(passage["title"], passage["text"], self.passage_prefix))
        return texts

    def _tokens(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(texts), truncation=True, max_length=max_length, padding=True,
                                   return_tensors="pt"))

    def __call__(self, groups: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        q = self._tokens([self.query_text(g) for g in groups], self.max_query_length)
        p = self._tokens([t for g in groups for t in self.passage_texts(g)], self.max_passage_length)
        batch = {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
                 "p_input_ids": p["input_ids"], "p_attention_mask": p["attention_mask"]}
        if self.llm_scores:
            batch["llm_scores"] = torch.tensor([list(g["scores"][:self.group_size]) for g in groups],
                                               dtype=torch.float)
        return batch


class AgenticRetrieverDataModule(L.LightningDataModule):
    def __init__(self, groups_path: str | None = None, corpus_path: str | None = None,
                 val_groups_path: str | None = None, tokenizer: str = "tiny-llama-world",
                 query_format: str = "Q+q", query_prefix: str = "query: ", passage_prefix: str = "passage: ",
                 group_size: int = 16, max_query_length: int = 64, max_passage_length: int = 128,
                 llm_scores: bool = False, batch_size: int = 32, eval_batch_size: int = 32,
                 val_fraction: float = 0.1, build: dict | None = None, questions: dict | None = None,
                 seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if groups_path and not corpus_path:
            raise ValueError("data.corpus_path is required with data.groups_path (the groups name passage ids)")
        self.save_hyperparameters()
        self.build_cfg = {**DEFAULT_BUILD, **dict(build or {})}
        self.build_cfg["agent"] = {**DEFAULT_BUILD["agent"], **dict((build or {}).get("agent") or {})}
        # With built groups the test questions come from the same world; with files, only when given.
        self.questions_cfg = dict(questions) if questions else (None if groups_path else dict(DEFAULT_QUESTIONS))
        self._groups: dict[str, list[dict[str, Any]]] | None = None
        self._corpus: list[dict[str, str]] | None = None
        self._qa: AgenticQADataModule | None = None
        self._test_questions: list[dict[str, Any]] = []
        self._tokenizer = None

    @classmethod
    def from_records(cls, groups: Sequence[Mapping[str, Any]], corpus: Sequence[Mapping[str, str]],
                     questions: Sequence[Mapping[str, Any]] = (), **kwargs: Any) -> AgenticRetrieverDataModule:
        """Over groups and a corpus already in memory (the iteration runner's path)."""
        dm = cls(**kwargs)
        dm._groups = dm._split([dict(g) for g in groups])
        dm._corpus = [dict(c) for c in corpus]
        dm._test_questions = list(questions)
        return dm

    # -- data ----------------------------------------------------------------------------------
    def qa(self) -> AgenticQADataModule:
        if self.questions_cfg is None:
            raise ValueError("no questions configured: set data.questions (AgenticQADataModule options) "
                             "to label or evaluate end to end")
        if self._qa is None:
            self._qa = AgenticQADataModule(**self.questions_cfg)
        return self._qa

    def corpus(self) -> list[dict[str, str]]:
        if self._corpus is None:
            h = self.hparams
            self._corpus = read_corpus(h.corpus_path) if h.corpus_path else list(self.qa().load()[1])
        return self._corpus

    def build_groups(self) -> list[dict[str, Any]]:
        """Label the training questions' searches (scripted agent, BoW retriever, heuristic judge)."""
        from zoo.agentic_r.agents import ScriptedSearchAgent, SearchTool
        from zoo.agentic_r.labeling import HeuristicJudge, UtilityLabeler

        b = self.build_cfg
        tool = SearchTool(self.qa().environment(retriever=b["retriever"]), b["query_format"], b["k"])
        labeler = UtilityLabeler(ScriptedSearchAgent(**b["agent"]), tool, HeuristicJudge(b["use_sub_answers"]),
                                 candidates=b["candidates"], lr_batch_size=b["lr_batch_size"],
                                 lr_threshold=b["lr_threshold"], max_positives=b["max_positives"],
                                 negatives=self.hparams.group_size - 1, max_round=b["max_round"],
                                 selection=b["selection"], seed=self.hparams.seed)
        return labeler(self.qa().samples("train"))

    def _split(self, groups: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """Hold out whole questions (all their rounds and positives) for validation."""
        questions = sorted({g["question"] for g in groups})
        random.Random(self.hparams.seed).shuffle(questions)
        held = set(questions[:round(len(questions) * self.hparams.val_fraction)])
        return {"train": [g for g in groups if g["question"] not in held],
                "val": [g for g in groups if g["question"] in held]}

    def groups(self, split: str) -> list[dict[str, Any]]:
        if self._groups is None:
            h = self.hparams
            if h.groups_path:
                train = read_groups(h.groups_path, h.group_size)
                self._groups = ({"train": train, "val": read_groups(h.val_groups_path, h.group_size)}
                                if h.val_groups_path else self._split(train))
            else:
                self._groups = self._split(self.build_groups())
            if not self._groups["train"]:
                raise ValueError("no training groups: every labelled round was skipped by the selection rule")
        return self._groups[split]

    def test_questions(self) -> list[dict[str, Any]]:
        if self._test_questions:
            return self._test_questions
        return self.qa().samples("test")

    def collator(self) -> GroupCollator:
        h = self.hparams
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(h.tokenizer)
        return GroupCollator(self._tokenizer, {c["id"]: c for c in self.corpus()}, h.group_size, h.query_format,
                             h.query_prefix, h.passage_prefix, h.max_query_length, h.max_passage_length,
                             h.llm_scores)

    # -- loaders -------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.groups("train"), batch_size=self.hparams.batch_size, shuffle=True,
                          collate_fn=self.collator(), num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.groups("val"), batch_size=self.hparams.eval_batch_size, shuffle=False,
                          collate_fn=self.collator(), num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_questions(), batch_size=self.hparams.eval_batch_size, shuffle=False,
                          collate_fn=list, num_workers=self.hparams.num_workers)
