"""The Stage-1 decoder: a zoo backbone with its LM head, or the spec's tiny Llama over MiniLM's WordPiece."""
from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from zoo.backbones import build_backbone, minilm_path

# A random 2-layer Llama over all-MiniLM-L6-v2's WordPiece vocabulary (30,522 words), the spec's
# embedded default: real words as tokens, so short passages fit in a few dozen positions.
TINY_LLAMA_MINILM = "tiny-llama-minilm"


def minilm_wordpiece_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    # BERT's tokenizer has no end token; [SEP] plays [E] and the end of the query.
    tokenizer.eos_token, tokenizer.bos_token = "[SEP]", "[CLS]"
    return tokenizer


def build_decoder(name: str, overrides: dict[str, Any] | None = None, attn_implementation: str = "sdpa"):
    """(causal LM, tokenizer). Attention must accept a custom 4D mask: eager or sdpa, never flash."""
    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be eager or sdpa (a custom 4D mask), got '{attn_implementation}'")
    if name == TINY_LLAMA_MINILM:
        tokenizer = minilm_wordpiece_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                             eos_token_id=tokenizer.sep_token_id, tie_word_embeddings=False)
        for key, value in (overrides or {}).items():
            setattr(config, key, value)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model, tokenizer = build_backbone(name, causal_lm=True, config_overrides=overrides)
    model.set_attn_implementation(attn_implementation)
    return model.eval(), tokenizer
