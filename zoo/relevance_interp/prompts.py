"""Clean / corrupted yes-no relevance prompts with aligned token spans (the paper's data_utils).

Pointwise: clean shows the relevant document, corrupted a hard negative; pairwise: clean shows
(A = relevant, B = negative), corrupted the swap. Documents are cut to one token length so both
prompts have the same length and every span sits at the same positions; ``build_pair`` then checks
that the two prompts differ only inside the document span(s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zoo.blocks.llm import chat_prompt_with_spans

FORMATS = ("pointwise", "pairwise")
LAYOUTS = {"pointwise": ("DQI", "QDI", "IDQ"), "pairwise": ("DQI", "IDQ")}
INSTRUCTIONS = {
    "pointwise": "Does the document answer the query? Only output 'yes' or 'no'.",
    "pairwise": "Is document A more relevant to the query? Only output 'yes' or 'no'.",
}
SPAN_GROUPS = ("query", "doc", "inst")
GROUPS = ("all", "last", "query_all", "doc_all", "inst_all", "qd_all", "other", "query_first", "query_last",
          "doc_first", "doc_last", "inst_first", "inst_last")


@dataclass
class PromptPair:
    clean_ids: list[int]
    corrupt_ids: list[int]
    spans: dict[str, tuple[int, int]]     # token [start, end) of query, doc (or doc_a, doc_b), inst

    @property
    def length(self) -> int:
        return len(self.clean_ids)

    def doc_spans(self) -> list[tuple[int, int]]:
        return [span for name, span in sorted(self.spans.items()) if name.startswith("doc")]


def segments(fmt: str, layout: str, query: str, docs: list[str]) -> list[tuple[str | None, str]]:
    """The user turn as (span name or None, text) pieces, blocks separated by a blank line.

    The space after "Document:" / "Query:" belongs to the span: byte-level BPE tokenizers glue it
    to the first word (" The") or emit it alone (before a digit), and either way the span, not
    the label, must absorb the difference."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose one of {FORMATS}")
    if layout not in LAYOUTS[fmt]:
        raise ValueError(f"unknown {fmt} layout '{layout}'; choose one of {LAYOUTS[fmt]}")
    if fmt == "pointwise":
        doc_blocks = [[(None, "Document:"), ("doc", _spaced(docs[0]))]]
    else:
        doc_blocks = [[(None, "Document A:"), ("doc_a", _spaced(docs[0]))],
                      [(None, "Document B:"), ("doc_b", _spaced(docs[1]))]]
    blocks = {"D": doc_blocks, "Q": [[(None, "Query:"), ("query", _spaced(query))]],
              "I": [[("inst", INSTRUCTIONS[fmt])]]}
    out: list[tuple[str | None, str]] = []
    for letter in layout:
        for block in blocks[letter]:
            if out:
                out.append((None, "\n\n"))
            out += block
    return out


def _spaced(text: str) -> str:
    return " " + text.strip()


def cut_to_tokens(tokenizer: Any, text: str, n: int) -> str:
    """The prefix of ``text`` that holds its first ``n`` tokens (tokenized alone)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= n else text[:offsets[n - 1][1]]


def build_pair(tokenizer: Any, fmt: str, layout: str, query: str, positive: str, negative: str,
               max_doc_tokens: int | None = None, system: str | None = None, tries: int = 16) -> PromptPair:
    """Clean and corrupted prompts of equal length with identical spans (documents cut to the
    shorter one, or to ``max_doc_tokens``). A cut that lands on a different in-context length is
    retried one token shorter."""
    lengths = [len(tokenizer(_spaced(d), add_special_tokens=False)["input_ids"]) for d in (positive, negative)]
    n = min(lengths + ([max_doc_tokens] if max_doc_tokens else []))
    for _ in range(tries):
        if n < 1:
            break
        pos, neg = (cut_to_tokens(tokenizer, _spaced(d), n) for d in (positive, negative))
        docs_clean, docs_corrupt = ([pos], [neg]) if fmt == "pointwise" else ([pos, neg], [neg, pos])
        clean, spans = chat_prompt_with_spans(tokenizer, segments(fmt, layout, query, docs_clean), system)
        corrupt, spans_corrupt = chat_prompt_with_spans(tokenizer, segments(fmt, layout, query, docs_corrupt), system)
        if len(clean) == len(corrupt) and spans == spans_corrupt:
            pair = PromptPair(clean, corrupt, spans)
            check_differs_only_in_documents(pair)
            return pair
        n -= 1
    raise ValueError(f"could not align the documents of query '{query[:60]}' to one token length")


def check_differs_only_in_documents(pair: PromptPair) -> None:
    inside = torch.zeros(pair.length, dtype=torch.bool)
    for start, end in pair.doc_spans():
        inside[start:end] = True
    differ = torch.tensor(pair.clean_ids) != torch.tensor(pair.corrupt_ids)
    stray = (differ & ~inside).nonzero().flatten().tolist()
    if stray:
        raise AssertionError(f"clean and corrupted prompts differ outside the documents at positions {stray}")


def position_groups(pair: PromptPair, names: list[str] | tuple[str, ...] = GROUPS) -> torch.Tensor:
    """[G, T] boolean masks of the named position groups (``doc`` = both documents in pairwise)."""
    T = pair.length
    spans = {"query": [pair.spans["query"]], "doc": pair.doc_spans(), "inst": [pair.spans["inst"]]}

    def cover(kind: str) -> torch.Tensor:
        mask = torch.zeros(T, dtype=torch.bool)
        for start, end in spans[kind]:
            mask[start:end] = True
        return mask

    masks = []
    for name in names:
        mask = torch.zeros(T, dtype=torch.bool)
        kind, _, where = name.partition("_")
        if name == "all":
            mask[:] = True
        elif name == "last":
            mask[-1] = True
        elif name == "qd_all":
            mask = cover("query") | cover("doc")
        elif name == "other":
            mask = ~(cover("query") | cover("doc") | cover("inst"))
        elif kind in SPAN_GROUPS and where == "all":
            mask = cover(kind)
        elif kind in SPAN_GROUPS and where in ("first", "last"):
            mask[spans[kind][0][0] if where == "first" else spans[kind][-1][1] - 1] = True
        else:
            raise ValueError(f"unknown position group '{name}'; choose from {GROUPS}")
        masks.append(mask)
    return torch.stack(masks)
