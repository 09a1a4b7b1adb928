"""RankGPT-style listwise prompts: instruction, numbered candidate documents, then the query."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase


@dataclass
class ListwisePrompt:
    instruction: str = ("Given a web search query and some relevant documents, "
                        "rerank the documents that answer the query")
    doc_header: str = "Documents:"
    query_prefix: str = "Search Query: "
    num_docs: int = 20
    max_doc_tokens: int = 48
    chat_template: bool = False

    def truncate(self, text: str, tokenizer: PreTrainedTokenizerBase | None, limit: int | None = None) -> str:
        """First ``limit`` (default max_doc_tokens) tokens of a document, cut in the original
        string (words without a tokenizer)."""
        limit = self.max_doc_tokens if limit is None else limit
        if limit <= 0:
            return ""
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            return " ".join(text.split()[:limit])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        truncation=True, max_length=limit)
        offsets = enc["offset_mapping"]
        return text[: offsets[-1][1]].strip() if offsets else ""

    def _render(self, query: str, docs: Sequence[str], tokenizer: PreTrainedTokenizerBase | None) -> str:
        """The finished prompt text, chat template included, from already truncated documents."""
        lines = [f"{self.instruction}:", self.doc_header]
        lines += [f"[{i}] {doc}" for i, doc in enumerate(docs, start=1)]
        lines.append(f"{self.query_prefix}{query}")
        text = "\n".join(lines)
        if not self.chat_template:
            return text
        if tokenizer is None or tokenizer.chat_template is None:
            raise ValueError("listwise prompt asks for a chat template but the tokenizer has none")
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)

    def doc_budget(self, query: str, n_docs: int, tokenizer: PreTrainedTokenizerBase | None,
                   max_tokens: int | None) -> int:
        """Tokens per document so the whole prompt fits ``max_tokens`` with the query, which
        comes last, intact: right truncation would otherwise cut the query off first."""
        if max_tokens is None or tokenizer is None or n_docs == 0:
            return self.max_doc_tokens
        skeleton = len(tokenizer(self._render(query, [""] * n_docs, tokenizer))["input_ids"])
        return max(0, min(self.max_doc_tokens, (max_tokens - skeleton) // n_docs))

    def build(self, query: str, docs: Sequence[str], tokenizer: PreTrainedTokenizerBase | None = None,
              max_tokens: int | None = None) -> str:
        shown = list(docs[: self.num_docs])
        limit = self.doc_budget(query, len(shown), tokenizer, max_tokens)
        return self._render(query, [self.truncate(doc, tokenizer, limit) for doc in shown], tokenizer)

    def as_dict(self) -> dict:
        return asdict(self)
