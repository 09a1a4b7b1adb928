"""Verifiable reasoning tasks for policy-gradient training: generated arithmetic and Countdown, and GSM8K.

A sample is a dict with at least ``prompt`` (the problem text), ``answer`` (what the reward
checks) and ``solution`` (a correct response, for supervised warm starts). Batches are lists
of samples: rollouts need the raw text, not tensors.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from datamodules.readers import DataFormatError
from zoo.registry import Registry

Sample = dict[str, Any]
TASKS = Registry("reasoning task")
register_task = TASKS.register


class Task:
    """A source of samples. Generated tasks draw from a seeded RNG; file tasks read a split."""

    def samples(self, split: str, count: int | None, seed: int) -> list[Sample]:
        raise NotImplementedError


@register_task("arithmetic")
class ArithmeticTask(Task):
    """``Q:37+48=`` -> an optional run of filler dots, then ``\\boxed{85}``.

    The filler lets a response be needlessly long (something for length-aware methods to
    remove); train and eval operand pairs are disjoint.
    """

    def __init__(self, low: int = 0, high: int = 49, max_filler: int = 6, eval_fraction: float = 0.2) -> None:
        self.low, self.high, self.max_filler, self.eval_fraction = low, high, max_filler, eval_fraction

    def _pairs(self, split: str, seed: int) -> list[tuple[int, int]]:
        pairs = [(a, b) for a in range(self.low, self.high + 1) for b in range(self.low, self.high + 1)]
        random.Random(12345).shuffle(pairs)                  # the split never depends on the run seed
        cut = int(len(pairs) * self.eval_fraction)
        return pairs[cut:] if split == "train" else pairs[:cut]

    def samples(self, split: str, count: int | None, seed: int) -> list[Sample]:
        pairs = self._pairs(split, seed)
        rng = random.Random(seed)
        if split == "train":
            picked = [rng.choice(pairs) for _ in range(count or len(pairs))]
        else:
            picked = pairs[:count] if count else pairs
        out = []
        for a, b in picked:
            filler = "." * rng.randint(0, self.max_filler)
            out.append({"prompt": f"Q:{a}+{b}=", "answer": str(a + b), "solution": f"{filler}\\boxed{{{a + b}}}"})
        return out


@register_task("countdown")
class CountdownTask(Task):
    """Reach a target with 3-4 given numbers, each used once, and + - * / (a TinyZero-style task).

    Targets are built from a random expression over the numbers, so every problem is solvable
    and that expression is a reference solution.
    """

    def __init__(self, min_numbers: int = 3, max_numbers: int = 4, max_value: int = 99, max_target: int = 999,
                 style: str = "verbose") -> None:
        if style not in ("verbose", "compact"):
            raise ValueError("countdown style must be verbose or compact")
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.max_value, self.max_target, self.style = max_value, max_target, style

    def _expression(self, numbers: list[int], rng: random.Random) -> tuple[str, int] | None:
        items = [(str(n), n) for n in numbers]
        rng.shuffle(items)
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            (ea, a), (eb, b) = items[i], items[j]
            op = rng.choice("+-*/")
            if op == "-" and a < b:
                (ea, a), (eb, b) = (eb, b), (ea, a)
            if op == "/" and (b == 0 or a % b):
                op = "+"
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
            items = [x for k, x in enumerate(items) if k not in (i, j)] + [(f"({ea}{op}{eb})", value)]
        expression, value = items[0]
        if not 1 <= value <= self.max_target:
            return None
        return expression[1:-1] if expression.startswith("(") else expression, value

    def prompt(self, numbers: list[int], target: int) -> str:
        if self.style == "compact":
            return f"N:{' '.join(map(str, numbers))} T:{target}="
        return (f"Using the numbers {numbers}, create an equation that equals {target}. You can use +, -, *, / "
                f"and each number exactly once. Show your reasoning, then give the equation in "
                f"<answer></answer> tags, for example <answer>(1 + 2) / 3</answer>.")

    def samples(self, split: str, count: int | None, seed: int) -> list[Sample]:
        rng = random.Random(f"countdown-{split}-{seed}")    # train and eval streams differ
        out = []
        while len(out) < (count or 1000):
            numbers = [rng.randint(1, self.max_value) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            built = self._expression(numbers, rng)
            if built is None:
                continue
            expression, target = built
            out.append({"prompt": self.prompt(numbers, target), "answer": str(target), "numbers": numbers,
                        "target": target, "solution": f"<answer>{expression}</answer>"})
        return out


@register_task("gsm8k")
class GSM8KTask(Task):
    """GSM8K jsonl (``question``, ``answer`` with the final number after '####')."""

    def __init__(self, path: str | None = None) -> None:
        if not path:
            raise ValueError("the gsm8k task needs data.path (the folder with train.jsonl / test.jsonl)")
        self.path = Path(path)

    def read(self, split: str) -> list[Sample]:
        file = self.path / f"{split}.jsonl"
        if not file.exists():
            raise FileNotFoundError(f"GSM8K split '{split}' not found: {file}")
        out = []
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    question, answer = row["question"], row["answer"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise DataFormatError(file, line_no, f"expected a JSON object with question and answer ({err})")
                if "####" not in answer:
                    raise DataFormatError(file, line_no, "answer has no '####' final-answer marker")
                steps, final = answer.rsplit("####", 1)
                final = final.strip().replace(",", "")
                steps = re.sub(r"<<[^>]*>>", "", steps).strip()   # calculator annotations
                out.append({"prompt": question, "answer": final, "id": f"{split}-{line_no}",
                            "solution": f"{steps}\nThe answer is \\boxed{{{final}}}."})
        return out

    def samples(self, split: str, count: int | None, seed: int) -> list[Sample]:
        rows = self.read(split)
        if split == "train":
            random.Random(seed).shuffle(rows)
        return rows[:count] if count else rows


class ReasoningDataModule(L.LightningDataModule):
    """Prompt batches for RL: ``train_batches`` batches per epoch; a fixed evaluation set.

    ``eval_split`` is ``test`` for GSM8K (its public test split) and a disjoint generated set
    for the generated tasks.
    """

    def __init__(self, task: str = "arithmetic", path: str | None = None, batch_size: int = 16,
                 train_batches: int = 100, eval_size: int = 128, eval_batch_size: int = 64,
                 eval_split: str = "test", task_options: dict[str, Any] | None = None, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown reasoning task '{task}'; registered: {', '.join(sorted(TASKS))}")
        self.save_hyperparameters()
        options = dict(task_options or {})
        if task == "gsm8k":
            options["path"] = path
        self.task = TASKS[task](**options)

    def train_samples(self) -> list[Sample]:
        count = self.hparams.batch_size * self.hparams.train_batches
        rows = self.task.samples("train", count, self.hparams.seed)
        while len(rows) < count:                              # small files: cycle
            rows = rows + rows
        return rows[:count]

    def demonstrations(self, count: int, seed: int) -> list[Sample]:
        """Samples with reference solutions for a supervised warm start (a different stream from training)."""
        rows = self.task.samples("train", count, seed + 7919)
        while len(rows) < count:
            rows = rows + rows
        return rows[:count]

    def _loader(self, rows: list[Sample], batch_size: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=list,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples(), self.hparams.batch_size)

    def eval_samples(self) -> list[Sample]:
        return self.task.samples(self.hparams.eval_split, self.hparams.eval_size, self.hparams.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_samples(), self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_samples(), self.hparams.eval_batch_size)
