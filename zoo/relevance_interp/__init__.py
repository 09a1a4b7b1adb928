"""How do LLMs understand relevance? Activation patching of yes/no relevance judgments (arXiv 2504.07898)."""
from zoo.relevance_interp.module import RelevancePatchingModule
from zoo.relevance_interp.prompts import PromptPair, build_pair, position_groups

__all__ = ["PromptPair", "RelevancePatchingModule", "build_pair", "position_groups"]
