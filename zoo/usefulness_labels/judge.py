"""The embedded default's judge: a tiny random Llama (2 layers, d_model 64) over a word-level tokenizer
that knows the prompts' words, the synthetic logs' words, numbers, yes/no and brackets, so every
prompt tokenizes without [UNK] floods and a bracket list or a level is one token per piece.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM

from zoo.backbones import build_word_tokenizer

JUDGE_PRESET = "tiny-usefulness-judge"
_PUNCTUATION = list("[](),.:;?!'\"-")


def judge_words(prompt_texts: Iterable[str]) -> list[str]:
    from datamodules.usefulness import synthetic_words

    words = [w for text in prompt_texts for w in re.findall(r"[\w-]+", text)]
    numbers = [str(i) for i in range(301)]
    return list(dict.fromkeys(["Yes", "No", "yes", "no"] + _PUNCTUATION + numbers + words + synthetic_words()))


def build_judge(prompt_texts: Iterable[str], overrides: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer); the weights are random (torch's global seed), the tokenizer fixed."""
    tokenizer = build_word_tokenizer(judge_words(prompt_texts), padding_side="left")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return LlamaForCausalLM(config), tokenizer
