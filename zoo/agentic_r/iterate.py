"""The agent <-> retriever alternation of Agentic-R.

Iteration 0 labels the agent's searches against the base retriever (the E5 stand-in: hashed bag of
words, input q); every iteration trains a retriever on the groups, rebuilds the search index with
it, and the next iteration's agent searches (and is labelled) through that retriever with its
"Q [SEP] q" input. Each retriever restarts from the *initial* encoder weights, as the reference
scripts restart from e5-base-v2; ``warm_start=True`` continues from the previous iteration instead.

``agent_for(iteration, tool)`` supplies the agent of an iteration: the scripted agent by default;
override it to (re)train a search agent against ``tool`` first (the paper's PPO step).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from datamodules.agentic_r import AgenticRetrieverDataModule
from zoo.agentic_r.agents import (
    ScriptedSearchAgent,
    SearchAgent,
    SearchTool,
    evaluate_agent,
    mean_metrics,
)
from zoo.agentic_r.labeling import HeuristicJudge, Judge, UtilityLabeler
from zoo.agentic_r.module import AgenticRetrieverModule
from zoo.blocks.search_env import SearchEnvironment, passages_from_records

INITIAL = "initial"


@dataclass
class IterationRecord:
    iteration: int
    init_source: str                     # "initial" or "iteration k": the weights training started from
    start_state: dict[str, torch.Tensor]
    groups: list[dict[str, Any]]
    module: AgenticRetrieverModule
    tool: SearchTool                     # the search tool rebuilt over this iteration's retriever
    metrics: dict[str, float] = field(default_factory=dict)


class AgenticRIteration:
    """Runs ``iterations`` rounds of label -> train retriever -> rebuild index -> evaluate."""

    def __init__(self, corpus: Sequence[Mapping[str, str]], train_questions: Sequence[Mapping[str, Any]],
                 test_questions: Sequence[Mapping[str, Any]] = (), *, module: Mapping[str, Any] | None = None,
                 data: Mapping[str, Any] | None = None, labeler: Mapping[str, Any] | None = None,
                 trainer: Mapping[str, Any] | None = None, agent: Mapping[str, Any] | None = None,
                 judge: Judge | None = None, iterations: int = 2, warm_start: bool = False,
                 base_retriever: str = "bow", base_query_format: str = "q", k: int = 3, seed: int = 0) -> None:
        self.corpus = [dict(c) for c in corpus]
        self.train_questions, self.test_questions = list(train_questions), list(test_questions)
        self.module_cfg = dict(module or {})
        self.data_cfg = dict(data or {})
        self.labeler_cfg = dict(labeler or {})
        self.trainer_cfg = {"max_epochs": 3, "accelerator": "cpu", "devices": 1, "logger": False,
                            "enable_checkpointing": False, "enable_progress_bar": False,
                            "enable_model_summary": False, "num_sanity_val_steps": 0, **dict(trainer or {})}
        self.agent_cfg = dict(agent or {})
        self.judge = judge or HeuristicJudge()
        self.iterations, self.warm_start = iterations, warm_start
        self.base_retriever, self.base_query_format, self.k = base_retriever, base_query_format, k
        self.seed = seed
        self.initial_state: dict[str, torch.Tensor] | None = None

    # -- hooks ---------------------------------------------------------------------------------
    def agent_for(self, iteration: int, tool: SearchTool) -> SearchAgent:
        return ScriptedSearchAgent(**self.agent_cfg)

    def build_module(self) -> AgenticRetrieverModule:
        return AgenticRetrieverModule(**self.module_cfg)

    # -- the loop ------------------------------------------------------------------------------
    def base_tool(self) -> SearchTool:
        env = SearchEnvironment(*passages_from_records(self.corpus), retriever=self.base_retriever, k=self.k)
        return SearchTool(env, self.base_query_format, self.k)

    def label(self, agent: SearchAgent, tool: SearchTool) -> list[dict[str, Any]]:
        options = {"negatives": self.data_cfg.get("group_size", 16) - 1, "seed": self.seed, **self.labeler_cfg}
        return UtilityLabeler(agent, tool, self.judge, **options)(self.train_questions)

    def train(self, groups: Sequence[Mapping[str, Any]], start: Mapping[str, torch.Tensor]) -> AgenticRetrieverModule:
        L.seed_everything(self.seed, workers=True, verbose=False)
        module = self.build_module()
        module.load_state_dict(start)
        h = module.hparams
        data = {"tokenizer": h.backbone, "query_format": h.query_format, "query_prefix": h.query_prefix,
                "passage_prefix": h.passage_prefix, "max_query_length": h.max_query_length,
                "max_passage_length": h.max_passage_length, "seed": self.seed, **self.data_cfg}
        datamodule = AgenticRetrieverDataModule.from_records(groups, self.corpus, self.test_questions, **data)
        L.Trainer(**self.trainer_cfg).fit(module, datamodule=datamodule)
        return module.eval()

    def run(self) -> list[IterationRecord]:
        L.seed_everything(self.seed, workers=True, verbose=False)
        self.initial_state = copy.deepcopy(self.build_module().state_dict())
        records: list[IterationRecord] = []
        tool = self.base_tool()
        for iteration in range(self.iterations):
            agent = self.agent_for(iteration, tool)
            groups = self.label(agent, tool)
            if not groups:
                raise ValueError(f"iteration {iteration}: the labeller kept no training groups")
            if self.warm_start and records:
                source, start = f"iteration {iteration - 1}", records[-1].module.state_dict()
            else:
                source, start = INITIAL, self.initial_state
            start = copy.deepcopy(dict(start))
            module = self.train(groups, start)
            tool = module.search_tool(self.corpus)          # the index, rebuilt with the new encoder
            metrics = mean_metrics(evaluate_agent(agent, tool, self.test_questions)) if self.test_questions else {}
            records.append(IterationRecord(iteration, source, start, groups, module, tool, metrics))
        return records
