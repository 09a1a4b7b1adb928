"""Dense retrieval over a corpus: encode once (cached by model and corpus), search, score."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from zoo.blocks.encoder import EmbeddingEncoder
from zoo.blocks.index import DenseIndex
from zoo.paths import cache_dir


def corpus_fingerprint(doc_ids: Sequence[str], texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for doc_id, text in zip(doc_ids, texts):
        digest.update(doc_id.encode())
        digest.update(b"\0")
        digest.update(text.encode())
        digest.update(b"\1")
    return digest.hexdigest()[:16]


def model_fingerprint(encoder: EmbeddingEncoder, max_length: int) -> str:
    """Changes with any weight, the pooling rule or the truncation length."""
    digest = hashlib.sha256(f"{encoder.pooling}|{encoder.normalize}|{encoder.append_eos}|{max_length}".encode())
    for name, tensor in encoder.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def encode_corpus(
    encoder: EmbeddingEncoder,
    doc_ids: Sequence[str],
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int | None = None,
    cache: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """Corpus embeddings in doc_ids order; with ``cache`` they are kept under the zoo cache."""
    path: Path | None = None
    if cache:
        key = f"{model_fingerprint(encoder, max_length or encoder.max_length)}-{corpus_fingerprint(doc_ids, texts)}"
        path = cache_dir() / "embeddings" / f"{key}.safetensors"
        if path.exists():
            return load_file(str(path))["embeddings"]
    emb = encoder.encode(list(texts), batch_size=batch_size, max_length=max_length,
                         progress="encoding corpus" if progress else False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        save_file({"embeddings": emb.contiguous()}, str(tmp))
        tmp.rename(path)
    return emb


def build_index(doc_ids: Sequence[str], embeddings: torch.Tensor, device: str = "auto") -> DenseIndex:
    index = DenseIndex(embeddings.shape[1], device=device)
    index.add(list(doc_ids), embeddings)
    return index
