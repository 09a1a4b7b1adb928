"""The catalogue of papers and the modules that implement them."""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("module", "callback", "strategy")


@dataclass(frozen=True)
class Entry:
    name: str
    paper: str
    arxiv: str
    kind: str
    module: str | None = None       # dotted path of the LightningModule / callback / strategy
    datamodule: str | None = None   # dotted path of its LightningDataModule
    status: str = "planned"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_PAPERS = [
    ("e2rank", "E2Rank: Your Text Embedding can Also be an Effective and Efficient Listwise Reranker",
     "2510.22733", "module"),
    ("boom", "Bagging-Based Model Merging for Robust General Text Embeddings", "2602.05787", "module"),
    ("utility_annotation", "Utility-Focused LLM Annotation for Retrieval and Retrieval-Augmented Generation", "2504.05220", "module"),
    ("llm_ql", "Unleashing the Power of LLMs in Dense Retrieval with Query Likelihood Modeling", "2504.05216", "module"),
    ("tourrank", "TourRank: Utilizing Large Language Models for Documents Ranking with a Tournament-Inspired Strategy", "2406.11678", "module"),
    ("gencrf", "GenCRF: Generative Clustering and Reformulation Framework for Enhanced Intent-Driven Information Retrieval", "2409.10909", "module"),
    ("usefulness_labels", "Leveraging LLMs to Evaluate Usefulness of Document", "2506.08626", "module"),
    ("relevance_interp", "How do Large Language Models Understand Relevance? A Mechanistic Interpretability Perspective", "2504.07898", "module"),
    ("jade", "JADE: Bridging the Strategic-Operational Gap in Dynamic Agentic RAG", "2601.21916", "module"),
    ("mask", "Beyond Monolithic Architectures: A Multi-Agent Search and Knowledge Optimization Framework for Agentic Search", "2601.04703", "module"),
    ("agentic_r", "Agentic-R: Learning to Retrieve for Agentic Search", "2601.11888", "module"),
    ("scma", "Self-Compression of Chain-of-Thought via Multi-Agent Reinforcement Learning", "2601.21919", "module"),
    ("rose", "Reinforced Efficient Reasoning via Semantically Diverse Exploration", "2601.05053", "module"),
    ("ma4div", "MA4DIV: Multi-Agent Reinforcement Learning for Search Result Diversification", "2403.17421", "module"),
    ("ultr_user_aware", "Addressing Personalized Bias for Unbiased Learning to Rank", "2508.20798", "module"),
    ("mergemix", "MergeMix: Optimizing Mid-Training Data Mixtures via Learnable Model Merging", "2601.17858", "module"),
    ("wsm", "WSM: Warmup-Stable and Merge (LR decay as checkpoint merging)", "2507.17634", "callback"),
    ("entrodrop", "EntroDrop: entropy-guided token dropout", "2512.23422", "callback"),
    ("mgs", "MGS: Modular Gradient Surgery for multi-domain RL", "2602.02301", "callback"),
    ("tre", "TRE: Trust Region Entropy", "2602.03635", "callback"),
]

# Generic entries the papers build on (not papers of the zoo themselves).
_GENERIC = [
    ("grpo", "Generic GRPO (group-relative policy optimisation, from DeepSeekMath)", "2402.03300", "module"),
    ("ppo", "Generic PPO (clipped surrogate, value head, GAE)", "1707.06347", "module"),
    ("dense", "Generic dense bi-encoder (InfoNCE over in-batch and hard negatives, as in DPR)", "2004.04906", "module"),
    ("causal_lm", "Generic causal-LM pretraining / SFT on token streams (hosts WSM and EntroDrop)", "", "module"),
]

_IMPLEMENTED = {
    "e2rank": ("zoo.e2rank.module.E2RankModule", "datamodules.retrieval.RetrievalDataModule", "implemented"),
    "dense": ("zoo.dense.module.DenseRetrieverModule", "datamodules.retrieval.RetrievalDataModule", "implemented"),
    "grpo": ("zoo.policy_gradient.module.GRPOModule", "datamodules.reasoning.ReasoningDataModule", "implemented"),
    "ppo": ("zoo.policy_gradient.module.PPOModule", "datamodules.reasoning.ReasoningDataModule", "implemented"),
    "rose": ("zoo.rose.module.ROSEModule", "datamodules.reasoning.ReasoningDataModule", "implemented"),
    "scma": ("zoo.scma.module.SCMAModule", "datamodules.scma.SCMADataModule", "implemented"),
    "ultr_user_aware": ("zoo.ultr_user_aware.module.UserAwareULTRModule", "datamodules.ltr.ClickLTRDataModule", "implemented"),
    "ma4div": ("zoo.ma4div.module.MA4DIVModule", "datamodules.diversity.DiversificationDataModule", "implemented"),
    "jade": ("zoo.jade.module.JADEModule", "datamodules.agentic_qa.AgenticQADataModule", "implemented"),
    "mask": ("zoo.mask.module.MASKModule", "datamodules.agentic_qa.AgenticQADataModule", "implemented"),
    "agentic_r": ("zoo.agentic_r.module.AgenticRetrieverModule", "datamodules.agentic_r.AgenticRetrieverDataModule",
                  "implemented"),
    "causal_lm": ("zoo.causal_lm.module.CausalLMModule", "datamodules.text.TextDataModule", "implemented"),
    "tourrank": ("zoo.tourrank.module.TourRankModule", "datamodules.trec_rerank.TrecRerankDataModule", "implemented"),
    "boom": ("zoo.boom.module.BoomModule", "datamodules.boom.BoomDataModule", "implemented"),
    "llm_ql": ("zoo.llm_ql.module.QLPretrainModule", "datamodules.llm_ql.QLPairsDataModule", "implemented"),
    "mergemix": ("zoo.mergemix.module.MergeMixModule", "datamodules.mixture.DomainMixtureDataModule", "implemented"),
    "gencrf": ("zoo.gencrf.module.GenCRFModule", "datamodules.gencrf.GenCRFDataModule", "implemented"),
    "usefulness_labels": ("zoo.usefulness_labels.module.CLUEModule", "datamodules.usefulness.UsefulnessDataModule",
                          "implemented"),
    "relevance_interp": ("zoo.relevance_interp.module.RelevancePatchingModule",
                         "datamodules.relevance_pairs.RelevancePairsDataModule", "implemented"),
    "utility_annotation": ("zoo.utility_annotation.module.UtilityRetrieverModule",
                           "datamodules.utility_annotation.UtilityAnnotationDataModule", "implemented"),
    "wsm": ("callbacks.wsm.WSM", None, "implemented"),
    "entrodrop": ("callbacks.entrodrop.EntroDrop", None, "implemented"),
    "mgs": ("callbacks.mgs.MGS", "datamodules.multidomain.MultiDomainDataModule", "implemented"),
    "tre": ("callbacks.tre.TRE", None, "implemented"),
}

REGISTRY: dict[str, Entry] = {}
for _name, _paper, _arxiv, _kind in _PAPERS + _GENERIC:
    _module, _datamodule, _status = _IMPLEMENTED.get(_name, (None, None, "planned"))
    REGISTRY[_name] = Entry(_name, _paper, _arxiv, _kind, _module, _datamodule, _status)


class UnknownNameError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get(name: str) -> Entry:
    if name not in REGISTRY:
        raise UnknownNameError(f"unknown zoo entry '{name}'; valid names: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def import_object(dotted: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def entries() -> list[Entry]:
    return list(REGISTRY.values())


class Registry(dict):
    """Components chosen by name in configs (advantages, policy losses, rewards, tasks).

    ``@REG.register("name")`` adds one; ``REG.lookup(name)`` fails with the registered names.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        def wrap(obj):
            self[name] = obj
            return obj
        return wrap

    def lookup(self, name: str) -> Any:
        if name not in self:
            raise KeyError(f"unknown {self.kind} '{name}'; registered: {', '.join(sorted(self))}")
        return self[name]
