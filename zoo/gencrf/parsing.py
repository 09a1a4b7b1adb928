"""Reading the LLM's clustering JSON and score lists, and the embedding fallbacks used when it fails.

A small or random LLM often breaks the format (single quotes, code fences, trailing text, extra
clusters), so the parsers are tolerant; when nothing usable is found they return None and the
caller falls back (and logs it): agglomerative clustering of the generated texts, and
similarity-derived scores.
"""
from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence

import torch

_CLUSTER_KEY = re.compile(r"cluster[\s_-]*(\d+)", re.IGNORECASE)
# 'cluster1': "text"  /  "cluster 2": 'text'  inside broken JSON
_QUOTED_ENTRY = re.compile(r"""["']?(cluster[\s_-]*\d+)["']?\s*:\s*(["'])(.*?)(?<!\\)\2""", re.IGNORECASE | re.DOTALL)
# Cluster 1: text   (one per line, prose answers)
_LINE_ENTRY = re.compile(r"^\W*(cluster[\s_-]*\d+)\W*?[:\-]\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def _ordered(entries: Sequence[tuple[str, object]], max_clusters: int) -> list[str] | None:
    """Texts of cluster entries in key order (cluster1, cluster2, ...), empties dropped, at most max_clusters."""
    numbered = []
    for position, (key, value) in enumerate(entries):
        match = _CLUSTER_KEY.search(str(key))
        rank = int(match.group(1)) if match else 10_000 + position
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = " ".join(str(v) for v in value.values())
        text = " ".join(str(value).split()) if value is not None else ""
        if text:
            numbered.append((rank, position, text))
    texts = [text for _, _, text in sorted(numbered)]
    return list(dict.fromkeys(texts))[:max_clusters] or None


def _json_object(text: str) -> dict | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    candidate = text[start:end + 1]
    for load in (json.loads, ast.literal_eval):
        try:
            value = load(candidate)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_clusters(text: str, max_clusters: int = 3) -> list[str] | None:
    """Refined queries from the clustering answer ``{'cluster1': ..., 'cluster2': ...}``.

    Tries strict JSON, then a Python literal (single quotes), then quoted ``clusterN: "..."``
    entries, then ``Cluster N: ...`` lines. Returns 1..max_clusters non-empty distinct texts, or None.
    """
    obj = _json_object(text)
    if obj:
        parsed = _ordered(list(obj.items()), max_clusters)
        if parsed:
            return parsed
    for pattern, group in ((_QUOTED_ENTRY, 3), (_LINE_ENTRY, 2)):
        entries = [(m.group(1), m.group(group).strip().strip("\"',}")) for m in pattern.finditer(text)]
        parsed = _ordered(entries, max_clusters)
        if parsed:
            return parsed
    return None


def parse_scores(text: str) -> list[float] | None:
    """Scores from ``[75, 40, 90]``: the first bracketed list holding numbers, else every number
    in the text; each clipped to the prompt's 1..100 range. None when the text has no number.
    Cluster names ("cluster1", "Cluster 2:") are not scores."""
    text = _CLUSTER_KEY.sub(" ", text)
    for inside in re.findall(r"\[([^\[\]]*)\]", text):
        numbers = _NUMBER.findall(inside)
        if numbers:
            break
    else:
        numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return [min(max(float(n), 1.0), 100.0) for n in numbers]


def cluster_fallback(texts: Sequence[str], embeddings: torch.Tensor, max_clusters: int = 3,
                     merge_cos: float = 0.9) -> list[list[int]]:
    """Groups of text indices: average-linkage agglomerative clustering on cosine distance, K in
    2..max_clusters chosen by silhouette, K = 1 when every pair is more similar than ``merge_cos``.
    Groups are ordered by their smallest member index."""
    n = len(texts)
    if n == 0:
        return []
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    cos = unit @ unit.T
    if n < 3 or bool((cos > merge_cos).all()):
        return [list(range(n))]
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    distance = (1.0 - cos).clamp(min=0.0).fill_diagonal_(0.0).numpy()
    best, best_score = None, -2.0
    for k in range(2, min(max_clusters, n - 1) + 1):
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distance)
        if len(set(labels.tolist())) < 2:
            continue
        score = float(silhouette_score(distance, labels, metric="precomputed"))
        if score > best_score:
            best, best_score = labels.tolist(), score
    if best is None:
        return [list(range(n))]
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(best):
        groups.setdefault(label, []).append(i)
    return sorted(groups.values(), key=min)


def medoid(indices: Sequence[int], embeddings: torch.Tensor) -> int:
    """The member with the highest summed cosine similarity to the rest of its group."""
    unit = torch.nn.functional.normalize(embeddings[list(indices)].float(), dim=-1)
    return list(indices)[int((unit @ unit.T).sum(1).argmax())]
