"""Stage-1 sequences: ``document prompt · [E] · query · end`` with labels, [E] positions and masks."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DOC_PROMPT = "Instruct: Given a retrieved passage, summarize the passage.\nPassage: {doc}\nSummarization: "
QUERY_PROMPT = ("Instruct: Given a web search query, retrieve the most relevant passage that answer the query.\n"
                "Query: {query}\nThe most relevant passage:")
IGNORE = -100


class QLSequenceBuilder:
    """Tokenises (document, query) pairs into one left-to-right sequence per pair.

    The document prompt is cut inside the passage text only, so the instruction and the
    ``Summarization:`` cue always survive (``truncate_prompt=True`` cuts the whole prompt from the
    right instead, as the reference code does). With ``fixed_doc_len`` every prompt is left-padded
    to ``doc_len`` so [E] sits at index ``doc_len`` in every row (reference layout); otherwise [E]
    follows each prompt directly and rows are right-padded.
    """

    def __init__(self, tokenizer, doc_template: str = DOC_PROMPT, query_template: str = "{query}",
                 doc_len: int = 200, max_query_length: int = 32, fixed_doc_len: bool = True,
                 lm_on_document: bool = False, truncate_prompt: bool = False) -> None:
        if "{doc}" not in doc_template:
            raise ValueError(f"doc_template must contain '{{doc}}': {doc_template!r}")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs an end token (used as [E]) and a pad token")
        self.tokenizer = tokenizer
        self.doc_template, self.query_template = doc_template, query_template
        self.doc_len, self.max_query_length = doc_len, max_query_length
        self.fixed_doc_len, self.lm_on_document, self.truncate_prompt = fixed_doc_len, lm_on_document, truncate_prompt
        prefix, suffix = doc_template.split("{doc}", 1)
        self._prefix, self._suffix = self._ids(prefix), self._ids(suffix)
        if len(self._prefix) + len(self._suffix) >= doc_len:
            raise ValueError(f"doc_len={doc_len} leaves no room for the passage inside the document prompt")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def doc_prompt_ids(self, doc: str) -> list[int]:
        if self.truncate_prompt:
            return self._ids(self.doc_template.format(doc=doc))[: self.doc_len]
        budget = self.doc_len - len(self._prefix) - len(self._suffix)
        return self._prefix + self._ids(doc)[:budget] + self._suffix

    def query_ids(self, query: str) -> list[int]:
        return self._ids(self.query_template.format(query=query))[: self.max_query_length - 1]

    def build(self, docs: Sequence[str], queries: Sequence[str]) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask``, ``e_pos`` (index of [E]), ``labels`` (-100 where no
        target) and ``query_mask`` (positions holding query tokens, the end token excluded)."""
        if len(docs) != len(queries):
            raise ValueError(f"{len(docs)} documents but {len(queries)} queries")
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rows = []
        for doc, query in zip(docs, queries):
            prompt, q = self.doc_prompt_ids(doc), self.query_ids(query)
            left = self.doc_len - len(prompt) if self.fixed_doc_len else 0
            rows.append((left, prompt, q))
        length = max(left + len(p) + 1 + len(q) + 1 for left, p, q in rows)
        batch = len(rows)
        input_ids = torch.full((batch, length), pad, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE, dtype=torch.long)
        query_mask = torch.zeros(batch, length, dtype=torch.bool)
        e_pos = torch.empty(batch, dtype=torch.long)
        for b, (left, prompt, q) in enumerate(rows):
            seq = prompt + [eos] + q + [eos]
            end = left + len(seq)
            input_ids[b, left:end] = torch.tensor(seq)
            attention_mask[b, left:end] = 1
            e = left + len(prompt)
            e_pos[b] = e
            first_target = left + 1 if self.lm_on_document else e + 1
            labels[b, first_target:end] = input_ids[b, first_target:end]
            query_mask[b, e + 1:e + 1 + len(q)] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "e_pos": e_pos,
                "labels": labels, "query_mask": query_mask}
