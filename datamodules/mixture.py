"""Domain mixtures for mid-training: every sequence comes from domain k with probability lambda_k.

The domains are generated string tasks (MergeMix's embedded default), one character per token:
- ``addition``: ``12+34=46`` (operands in [low, high]);
- ``reversal``: ``r:abcd=dcba`` (strings of ``min_len``..``max_len`` letters);
- ``sorting``: ``s:3142=1234`` (``min_len``..``max_len`` digits).

Training data: a seeded categorical draw gives each sequence its domain (``sample_domains``); the
sequence is then packed with whole ``EOS prompt answer`` examples of that domain up to
``block_size`` and padded (labels -100 on padding). The draw depends on ``seed`` only and the
dataset is the same on every rank, so under DDP the distributed sampler splits one stream whose
global domain frequencies are lambda. Expert training is ``ratios = one_hot(k)``.

A training batch is ``{"input_ids", "attention_mask", "labels"}`` ``[B, block_size]`` plus
``domain_id [B]``. Validation holds packed blocks of held-out examples; test holds ``eval_size``
held-out prompts per domain (never seen in training) for exact-match scoring, batched so that every
prompt in a batch has the same length (greedy decoding needs no padding):
``{"input_ids" [B, P], "domain_id" [B], "answers": list[str]}``.

Reuses ``datamodules.text``'s tokenizer loading and block dataset; the tokenizer is the attached
model's unless ``tokenizer`` names a backbone (``tiny-llama-char`` suits these tasks).
"""
from __future__ import annotations

import random
import string
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.text import TokenBlocks, attached_tokenizer, load_tokenizer
from zoo.registry import Registry

STRING_TASKS = Registry("string task")


@STRING_TASKS.register("addition")
class AdditionTask:
    def __init__(self, low: int = 10, high: int = 99) -> None:
        self.low, self.high = low, high

    def sample(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(self.low, self.high), rng.randint(self.low, self.high)
        return f"{a}+{b}=", str(a + b)


@STRING_TASKS.register("reversal")
class ReversalTask:
    def __init__(self, min_len: int = 3, max_len: int = 6, alphabet: str = string.ascii_lowercase) -> None:
        self.min_len, self.max_len, self.alphabet = min_len, max_len, alphabet

    def sample(self, rng: random.Random) -> tuple[str, str]:
        text = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(self.min_len, self.max_len)))
        return f"r:{text}=", text[::-1]


@STRING_TASKS.register("sorting")
class SortingTask:
    def __init__(self, min_len: int = 3, max_len: int = 6) -> None:
        self.min_len, self.max_len = min_len, max_len

    def sample(self, rng: random.Random) -> tuple[str, str]:
        digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(self.min_len, self.max_len)))
        return f"s:{digits}=", "".join(sorted(digits))


DEFAULT_DOMAINS = ("addition", "reversal", "sorting")


def check_ratios(ratios: Sequence[float], count: int, where: str = "data.ratios") -> np.ndarray:
    """The ratios as a probability vector (normalised), after checking length and signs."""
    values = np.asarray(ratios, dtype=np.float64)
    if values.shape != (count,):
        raise ValueError(f"{where}: {len(values)} ratios for {count} domains")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
        raise ValueError(f"{where}: ratios must be finite, >= 0 and not all 0, got {list(values)}")
    return values / values.sum()


def sample_domains(ratios: Sequence[float], count: int, seed: int) -> np.ndarray:
    """``count`` domain ids drawn i.i.d. from the categorical ``ratios`` (seeded, rank-independent)."""
    probabilities = check_ratios(ratios, len(ratios))
    return np.random.default_rng(seed).choice(len(probabilities), size=count, p=probabilities)


class PromptBatches(Dataset):
    """Pre-built test batches (one item = one batch of equal-length prompts)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index]


class DomainMixtureDataModule(L.LightningDataModule):
    """Packed sequences from ``domains`` (name, or name -> task options) mixed by ``ratios`` (uniform
    if null); ``num_train`` training sequences, ``num_val`` validation blocks, ``eval_size`` test
    prompts per domain."""

    def __init__(self, domains: Sequence[str] | dict[str, dict[str, Any]] | None = None,
                 ratios: Sequence[float] | None = None, tokenizer: str | None = None, block_size: int = 32,
                 batch_size: int = 32, eval_batch_size: int = 200, num_train: int = 4800, num_val: int = 64,
                 eval_size: int = 200, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        specs = dict(domains) if isinstance(domains, dict) else {name: {} for name in (domains or DEFAULT_DOMAINS)}
        if not specs:
            raise ValueError("DomainMixtureDataModule needs at least one domain (data.domains)")
        self.tasks = {name: STRING_TASKS.lookup(name)(**dict(options or {})) for name, options in specs.items()}
        self.ratios = check_ratios(ratios if ratios is not None else [1.0] * len(self.tasks), len(self.tasks))
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        self.splits: dict[str, Dataset] = {}

    @property
    def domains(self) -> list[str]:
        return list(self.tasks)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.tokenizer is None:
            self.tokenizer = attached_tokenizer(self)
        h = self.hparams
        held_out = self._held_out_prompts()
        self.splits = {
            "train": TokenBlocks(self._packed(h.num_train, f"train-{h.seed}", held_out, exclude=True)),
            "val": TokenBlocks(self._packed(h.num_val, f"val-{h.seed}", held_out, exclude=False)),
            "test": PromptBatches(self._prompt_batches(held_out)),
        }

    # -- generation --------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _held_out_prompts(self) -> dict[str, dict[str, str]]:
        """``eval_size`` distinct prompts (-> answer) per domain; training never draws them."""
        out = {}
        for name, task in self.tasks.items():
            rng = random.Random(f"mixture-eval-{name}-{self.hparams.seed}")
            prompts: dict[str, str] = {}
            for _ in range(100 * self.hparams.eval_size):
                if len(prompts) == self.hparams.eval_size:
                    break
                prompt, answer = task.sample(rng)
                prompts[prompt] = answer
            if len(prompts) < self.hparams.eval_size:
                raise ValueError(f"domain '{name}' has too few distinct prompts for eval_size="
                                 f"{self.hparams.eval_size} (data.eval_size)")
            out[name] = prompts
        return out

    def _packed(self, count: int, stream: str, held_out: dict[str, dict[str, str]], exclude: bool) -> dict[str, Tensor]:
        """``count`` sequences; each draws its domain from the ratios and packs whole examples of it."""
        h = self.hparams
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rngs = {name: random.Random(f"mixture-{stream}-{name}") for name in self.tasks}
        eval_items = {name: list(prompts.items()) for name, prompts in held_out.items()}
        domain_ids = sample_domains(self.ratios, count, seed=hash_seed(stream))
        input_ids = torch.full((count, h.block_size), pad, dtype=torch.long)
        labels = torch.full((count, h.block_size), -100, dtype=torch.long)
        for row, domain in enumerate(domain_ids.tolist()):
            name = self.domains[domain]
            tokens: list[int] = []
            while True:
                if exclude:
                    prompt, answer = self.tasks[name].sample(rngs[name])
                    if prompt in held_out[name]:
                        continue
                else:
                    prompt, answer = rngs[name].choice(eval_items[name])
                example = [eos] + self.encode(prompt + answer)
                if len(tokens) + len(example) + 1 > h.block_size:
                    break
                tokens += example
            tokens.append(eos)
            if len(tokens) < 2:
                raise ValueError(f"data.block_size={h.block_size} cannot hold one '{name}' example")
            input_ids[row, :len(tokens)] = torch.tensor(tokens)
            labels[row, :len(tokens)] = torch.tensor(tokens)
        return {"input_ids": input_ids, "attention_mask": (labels != -100).long(), "labels": labels,
                "domain_id": torch.as_tensor(domain_ids, dtype=torch.long)}

    def _prompt_batches(self, held_out: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
        eos = self.tokenizer.eos_token_id
        batches = []
        for domain, name in enumerate(self.domains):
            by_length: dict[int, list[tuple[list[int], str]]] = {}
            for prompt, answer in held_out[name].items():
                ids = [eos] + self.encode(prompt)
                by_length.setdefault(len(ids), []).append((ids, answer))
            for length in sorted(by_length):
                rows = by_length[length]
                for start in range(0, len(rows), self.hparams.eval_batch_size):
                    chunk = rows[start:start + self.hparams.eval_batch_size]
                    batches.append({"input_ids": torch.tensor([ids for ids, _ in chunk], dtype=torch.long),
                                    "domain_id": torch.full((len(chunk),), domain, dtype=torch.long),
                                    "answers": [answer for _, answer in chunk]})
        return batches

    # -- loaders -----------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=None, shuffle=False, num_workers=self.hparams.num_workers)


def hash_seed(text: str) -> int:
    """A stable 32-bit seed from a string (Python's ``hash`` is salted per process)."""
    return random.Random(text).getrandbits(32)
