"""Open-domain QA answer metrics with the standard (SQuAD / DPR) answer normalisation.

Every metric takes a prediction and the gold aliases and returns the best score over the aliases.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
YES_NO = ("yes", "no")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _aliases(gold: str | Sequence[str]) -> list[str]:
    return [gold] if isinstance(gold, str) else list(gold)


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _aliases(gold)))


def cover_exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    """1 when a normalised gold alias occurs in the normalised prediction (FlashRAG's "acc")."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(g)} " in pred for g in _aliases(gold) if normalize_answer(g)))


def token_f1(prediction: str, gold: str | Sequence[str]) -> float:
    """SQuAD token F1, the maximum over aliases.

    A yes/no/noanswer prediction or alias only scores when both sides are that same word,
    as in the HotpotQA evaluation script.
    """
    pred = normalize_answer(prediction)
    best = 0.0
    for alias in _aliases(gold):
        ref = normalize_answer(alias)
        if (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
            continue
        common = Counter(pred.split()) & Counter(ref.split())
        same = sum(common.values())
        if same == 0:
            continue
        precision, recall = same / len(pred.split()), same / len(ref.split())
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def is_yes_no(gold: str | Sequence[str]) -> bool:
    return any(normalize_answer(g) in YES_NO for g in _aliases(gold))


def answer_score(prediction: str, gold: str | Sequence[str]) -> float:
    """The agentic-RAG reward: EM when a gold alias is yes/no, token F1 otherwise (JADE, M-ASK)."""
    return exact_match(prediction, gold) if is_yes_no(gold) else token_f1(prediction, gold)


def qa_metrics(prediction: str, gold: str | Sequence[str]) -> dict[str, float]:
    return {"em": exact_match(prediction, gold), "f1": token_f1(prediction, gold),
            "cover_em": cover_exact_match(prediction, gold)}
