"""Token streams for causal language modelling: a generated "limited domain" corpus, or text files.

Documents are tokenized, joined with the tokenizer's end-of-sequence token and cut into
fixed ``block_size`` blocks (packing; the remainder is dropped). A batch is
``{"input_ids", "attention_mask", "labels"}`` ``[B, block_size]`` with ``labels`` a copy of the
inputs (every position is a loss token); generated batches also carry ``token_kind`` (0 =
template, 1 = content, -1 = neither), the generator's ground truth of which tokens are
predictable.

The tokenizer is the attached model's (``module.tokenizer``) unless ``tokenizer`` names a backbone.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

TEMPLATE, CONTENT, OTHER = 0, 1, -1
CONTENT_WORDS = tuple("abcdefghijklmnop")        # one token each in the tiny and BPE tokenizers
HEADER = ["the", "model", "of", "this", "study", "is"]
FOOTER = ["and", "that", "is", "the", "result"]


class FactCorpus:
    """Documents ``HEADER (c1 c2 c3 = c1 c2 c3 ;) x units FOOTER``.

    The content tokens ``c`` follow an order-1 Markov chain over ``CONTENT_WORDS`` with
    Zipf-weighted transitions (moderate entropy, learnable); everything else (the fixed
    phrases, the delimiters and the copy after ``=``) is determined by the context. The
    chain depends on ``seed`` only, so every split is the same "domain".
    """

    def __init__(self, seed: int = 0, units: int = 5, zipf: float = 1.0) -> None:
        rng = random.Random(f"fact-corpus-{seed}")
        self.units = units
        weights = [1.0 / (r + 1) ** zipf for r in range(len(CONTENT_WORDS))]
        self.transitions = []
        for _ in CONTENT_WORDS:
            order = list(range(len(CONTENT_WORDS)))
            rng.shuffle(order)
            row = [0.0] * len(order)
            for rank, state in enumerate(order):
                row[state] = weights[rank]
            self.transitions.append(row)

    def entropy_rate(self) -> float:
        """Nats per content token (every row is a permutation of the same weights)."""
        row = self.transitions[0]
        total = sum(row)
        return -sum(w / total * math.log(w / total) for w in row)

    def document(self, rng: random.Random) -> list[tuple[str, int]]:
        words = [(w, TEMPLATE) for w in HEADER]
        state = rng.randrange(len(CONTENT_WORDS))
        for _ in range(self.units):
            content = []
            for _ in range(3):
                state = rng.choices(range(len(CONTENT_WORDS)), weights=self.transitions[state])[0]
                content.append(CONTENT_WORDS[state])
            words += [(w, CONTENT) for w in content] + [("=", TEMPLATE)]
            words += [(w, TEMPLATE) for w in content] + [(";", TEMPLATE)]
        return words + [(w, TEMPLATE) for w in FOOTER]


def tokenize_words(tokenizer: Any, words: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Token ids of the space-joined words and each token's kind (a word's continuation pieces get OTHER)."""
    text, starts = "", []
    for word, _ in words:
        text += (" " if text else "")
        starts.append(len(text))
        text += word
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    word_of_char = [0] * len(text)
    for index, start in enumerate(starts):
        for pos in range(start, start + len(words[index][0])):
            word_of_char[pos] = index
    kinds, previous = [], -1
    for start, end in encoded["offset_mapping"]:
        index = word_of_char[max(end - 1, start)] if end > start else previous
        kinds.append(words[index][1] if index != previous else OTHER)
        previous = index
    return list(encoded["input_ids"]), kinds


class TokenBlocks(Dataset):
    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}


def pack(ids: list[int], kinds: list[int] | None, block_size: int, max_blocks: int | None = None) -> dict[str, Tensor]:
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    input_ids = torch.tensor(ids[:n * block_size], dtype=torch.long).view(n, block_size)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    if kinds is not None:
        out["token_kind"] = torch.tensor(kinds[:n * block_size], dtype=torch.long).view(n, block_size)
    return out


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    from zoo.backbones import TINY_PRESETS, build_backbone, resolve_path
    if name in TINY_PRESETS:
        return build_backbone(name, causal_lm=True)[1]
    return AutoTokenizer.from_pretrained(resolve_path(name))


def text_files(path: str | Path) -> list[Path]:
    """A .txt file, or every .txt file under a folder (sorted)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"text data path not found: {root} (data.path)")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .txt files under {root} (data.path)")
    return files


def attached_tokenizer(datamodule: L.LightningDataModule) -> Any:
    """The tokenizer of the model the trainer runs, for a datamodule built without ``data.tokenizer``."""
    module = datamodule.trainer.lightning_module if datamodule.trainer is not None else None
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{type(datamodule).__name__} needs a tokenizer: set data.tokenizer to a backbone name, "
                         "or attach a model with a `tokenizer` attribute")
    return tokenizer


class TextDataModule(L.LightningDataModule):
    """``source: generated`` (``FactCorpus``; ``num_train/num_val/num_test`` blocks, each split its own
    random stream) or ``source: files`` (``path``; the token stream's last ``val_fraction`` and
    ``test_fraction`` become validation and test, in order; ``num_train`` caps the training blocks)."""

    def __init__(self, source: str = "generated", path: str | None = None, tokenizer: str | None = None,
                 block_size: int = 64, batch_size: int = 16, eval_batch_size: int | None = None,
                 num_train: int | None = 256, num_val: int = 128, num_test: int = 128,
                 val_fraction: float = 0.05, test_fraction: float = 0.05, generator: dict[str, Any] | None = None,
                 seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if source not in ("generated", "files"):
            raise ValueError(f"data.source must be generated or files, not '{source}'")
        if source == "files" and not path:
            raise ValueError("data.source=files needs data.path (a .txt file or a folder of them)")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        self.token_kinds = ("template", "content") if source == "generated" else ()
        self.splits: dict[str, TokenBlocks] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.tokenizer is None:
            self.tokenizer = attached_tokenizer(self)
        built = self._generated() if self.hparams.source == "generated" else self._files()
        self.splits = {name: TokenBlocks(tensors) for name, tensors in built.items()}

    def _eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]

    def _generated(self) -> dict[str, dict[str, Tensor]]:
        h = self.hparams
        corpus = FactCorpus(seed=h.seed, **dict(h.generator or {}))
        out = {}
        for split, count in (("train", h.num_train), ("val", h.num_val), ("test", h.num_test)):
            rng = random.Random(f"text-{split}-{h.seed}")
            ids: list[int] = []
            kinds: list[int] = []
            while len(ids) < count * h.block_size:
                doc_ids, doc_kinds = tokenize_words(self.tokenizer, corpus.document(rng))
                ids += doc_ids + self._eos()
                kinds += doc_kinds + [OTHER] * len(self._eos())
            out[split] = pack(ids, kinds, h.block_size, count)
        return out

    def _files(self) -> dict[str, dict[str, Tensor]]:
        h = self.hparams
        ids: list[int] = []
        for file in text_files(h.path):
            text = file.read_text(encoding="utf-8")
            if text.strip():
                ids += self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + self._eos()
        blocks = pack(ids, None, h.block_size)
        n = blocks["input_ids"].shape[0]
        n_val = max(1, round(n * h.val_fraction))
        n_test = max(1, round(n * h.test_fraction))
        n_train = n - n_val - n_test
        if n_train < 1:
            raise ValueError(f"{h.path}: {len(ids)} tokens make {n} blocks of {h.block_size}; too few for "
                             "train, validation and test splits (lower data.block_size or add text)")
        cuts = {"train": (0, min(n_train, h.num_train or n_train)), "val": (n_train, n_train + n_val),
                "test": (n_train + n_val, n)}
        return {split: {k: v[a:b] for k, v in blocks.items()} for split, (a, b) in cuts.items()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        h = self.hparams
        size = h.batch_size if split == "train" else (h.eval_batch_size or h.batch_size)
        return DataLoader(self.splits[split], batch_size=size, shuffle=shuffle, num_workers=h.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
