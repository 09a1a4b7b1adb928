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

    def truncate(self, text: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
        """First max_doc_tokens tokens of a document, cut in the original string (words without a tokenizer)."""
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            return " ".join(text.split()[: self.max_doc_tokens])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        truncation=True, max_length=self.max_doc_tokens)
        offsets = enc["offset_mapping"]
        return text[: offsets[-1][1]].strip() if offsets else ""

    def build(self, query: str, docs: Sequence[str], tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        shown = docs[: self.num_docs]
        lines = [f"{self.instruction}:", self.doc_header]
        lines += [f"[{i}] {self.truncate(doc, tokenizer)}" for i, doc in enumerate(shown, start=1)]
        lines.append(f"{self.query_prefix}{query}")
        text = "\n".join(lines)
        if self.chat_template:
            if tokenizer is None or tokenizer.chat_template is None:
                raise ValueError("listwise prompt asks for a chat template but the tokenizer has none")
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return text

    def as_dict(self) -> dict:
        return asdict(self)
