"""Input Corruption (v3: Document Corruption): passage words replaced by a placeholder."""
from __future__ import annotations

import random

PLACEHOLDER = "_"


def corrupt_words(text: str, p: float, rng: random.Random, placeholder: str = PLACEHOLDER) -> str:
    """Each whitespace-separated word becomes ``placeholder`` with probability ``p`` (i.i.d.).

    ``p = 0`` returns the text untouched (whitespace included).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"corruption probability must lie in [0, 1], got {p}")
    if p == 0.0:
        return text
    return " ".join(placeholder if rng.random() < p else word for word in text.split())
