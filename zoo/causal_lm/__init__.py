"""Generic causal language modelling: pretraining or SFT on token streams over any causal LM.

The entry the training techniques (WSM, EntroDrop, TRE) attach to: batches are
``{input_ids, attention_mask, labels}`` dicts, and ``forward_logits`` / ``token_loss_mask``
expose the per-token logits and loss positions they read.
"""
from zoo.causal_lm.module import CausalLMModule

__all__ = ["CausalLMModule"]
