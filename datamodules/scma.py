"""SCMA's embedded-default task: chained additions whose reasoning carries removable filler sentences.

``Add 3, 4 and 5.`` -> ``3+4=7. Wait, let me check. 7+5=12. \\boxed{12}``: one partial-sum
sentence per addition, then the boxed answer; demonstrations insert 0..``max_filler`` filler
sentences at random boundaries, so a warm-started policy pads its reasoning and a length-aware
method has something to remove. Each sample also lists its sentences labelled ``essential`` or
``filler`` (the SCMA module builds its segmentation/scoring warm start and its oracle scorer from
them) and the problem's filler sentences (to count them in any response).
"""
from __future__ import annotations

import itertools
import random
from typing import Any

from datamodules.reasoning import ReasoningDataModule, Sample, Task, register_task

FILLERS = ("Wait, let me check.", "Restating: add {numbers}.", "Let me think again.")


def spoken(numbers: list[int]) -> str:
    """3, 4 and 5."""
    return ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"


def filler_sentences(numbers: list[int]) -> list[str]:
    return [f.format(numbers=spoken(numbers)) for f in FILLERS]


@register_task("chain_sum")
class ChainSumTask(Task):
    """Sums of ``min_terms..max_terms`` integers in [low, high]; train and eval tuples are disjoint."""

    def __init__(self, low: int = 1, high: int = 9, min_terms: int = 3, max_terms: int = 3, max_filler: int = 4,
                 eval_fraction: float = 0.2) -> None:
        if not 2 <= min_terms <= max_terms:
            raise ValueError("chain_sum needs 2 <= min_terms <= max_terms")
        self.low, self.high, self.min_terms, self.max_terms = low, high, min_terms, max_terms
        self.max_filler, self.eval_fraction = max_filler, eval_fraction

    def _tuples(self, split: str) -> list[tuple[int, ...]]:
        values = range(self.low, self.high + 1)
        tuples = [t for n in range(self.min_terms, self.max_terms + 1) for t in itertools.product(values, repeat=n)]
        random.Random(12345).shuffle(tuples)                  # the split never depends on the run seed
        cut = int(len(tuples) * self.eval_fraction)
        return tuples[cut:] if split == "train" else tuples[:cut]

    def sample(self, numbers: list[int], rng: random.Random) -> Sample:
        steps, total = [], numbers[0]
        for n in numbers[1:]:
            steps.append((f"{total}+{n}={total + n}.", "essential"))
            total += n
        steps.append((f"\\boxed{{{total}}}", "essential"))
        fillers = filler_sentences(numbers)
        for _ in range(rng.randint(0, self.max_filler)):
            steps.insert(rng.randint(0, len(steps) - 1), (rng.choice(fillers), "filler"))   # never after the answer
        return {"prompt": f"Add {spoken(numbers)}.", "answer": str(total), "numbers": numbers,
                "solution": " ".join(text for text, _ in steps), "steps": [list(s) for s in steps],
                "fillers": fillers}

    def samples(self, split: str, count: int | None, seed: int) -> list[Sample]:
        tuples = self._tuples(split)
        rng = random.Random(f"chain_sum-{split}-{seed}")
        picked = [rng.choice(tuples) for _ in range(count or len(tuples))] if split == "train" \
            else tuples[:count] if count else tuples
        return [self.sample(list(t), rng) for t in picked]


class SCMADataModule(ReasoningDataModule):
    """The reasoning datamodule with ``chain_sum`` as its default task (any registered task works)."""

    def __init__(self, task: str = "chain_sum", **kwargs: Any) -> None:
        super().__init__(task=task, **kwargs)
