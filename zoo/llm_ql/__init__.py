"""LLM-QL (arXiv 2504.05216): query-likelihood pre-training of a decoder before contrastive retrieval.

Stage 1 (``module.QLPretrainModule``) trains P(query | document) through the end token [E] alone
(Attention Stop / Attention Block mask) on word-corrupted documents (Input / Document Corruption).
Stage 2 is the zoo's ``DenseRetrieverModule`` with last-token pooling, started from the Stage-1
weights exported by ``QLPretrainModule.save_pretrained`` (``<folder>/hf``).
"""
from zoo.llm_ql.corruption import corrupt_words
from zoo.llm_ql.masks import build_attention_stop_mask, position_ids_from_mask

__all__ = ["build_attention_stop_mask", "corrupt_words", "position_ids_from_mask"]
