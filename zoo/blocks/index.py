"""Exact inner-product search with faiss, on the GPU when faiss-gpu and a GPU are present."""
from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
import torch


def _as_float32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class DenseIndex:
    """IndexFlatIP over document embeddings keyed by string ids.

    ``device="auto"`` moves the index to GPU 0 when faiss-gpu sees a GPU; cosine search
    needs normalised embeddings (the encoder's default).
    """

    def __init__(self, dim: int, device: str = "auto") -> None:
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"DenseIndex device must be auto, cpu or gpu, not '{device}'")
        if device == "gpu" and not gpu_available():
            raise RuntimeError("DenseIndex(device='gpu') needs faiss-gpu and a visible GPU "
                               "(pip install 'zoo[gpu]')")
        self.dim = dim
        self.ids: list[str] = []
        index = faiss.IndexFlatIP(dim)
        self.on_gpu = device == "gpu" or (device == "auto" and gpu_available())
        if self.on_gpu:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, 0, index)
        self.index = index

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: Sequence[str], embeddings: torch.Tensor | np.ndarray) -> None:
        vectors = _as_float32(embeddings)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"expected {len(ids)} embeddings of dim {self.dim}, got {vectors.shape}")
        self.index.add(vectors)
        self.ids.extend(ids)

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        k = min(k, len(self.ids))
        scores, rows = self.index.search(_as_float32(queries), k)
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows]

    def search_run(self, query_ids: Sequence[str], queries: torch.Tensor | np.ndarray,
                   k: int) -> dict[str, dict[str, float]]:
        """Top-k per query as a run: {qid: {docid: score}}."""
        scores, ids = self.search(queries, k)
        return {qid: dict(zip(doc_ids, map(float, row))) for qid, doc_ids, row in zip(query_ids, ids, scores)}

