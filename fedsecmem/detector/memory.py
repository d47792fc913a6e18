"""Memory banks: nearest-neighbour search over memory items with faiss."""

from __future__ import annotations

import faiss
import numpy as np
import torch

from fedsecmem.detector.coreset import coreset_size, greedy_coreset_radius

__all__ = ["MemoryBank", "coreset_bank"]


def _sync_threads() -> None:
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))


class MemoryBank:
    """Exact L2 nearest-neighbour index over ``items`` (M, D). ``radius``: for a coreset bank, the
    largest distance from any patch it was chosen from to its nearest item (else None)."""

    def __init__(self, items: np.ndarray, radius: float | None = None):
        items = np.ascontiguousarray(items, dtype=np.float32)
        if items.ndim != 2 or len(items) == 0:
            raise ValueError(f"memory bank needs a non-empty (M, D) array, got shape {items.shape}")
        _sync_threads()
        self.items = items
        self.radius = radius
        self.index = faiss.IndexFlatL2(items.shape[1])
        self.index.add(items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return self.items.shape[1]

    @property
    def nbytes(self) -> int:
        return int(self.items.nbytes)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(distances (Q, k), indices (Q, k)) of the k nearest items (Euclidean, not squared)."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(k, len(self))
        d2, idx = self.index.search(q, k)
        return np.sqrt(np.maximum(d2, 0.0)), idx

    def nearest_distance(self, queries: np.ndarray) -> np.ndarray:
        return self.search(queries, 1)[0][:, 0]


def coreset_bank(patches: np.ndarray, ratio: float, seed: int = 0, progress=None) -> MemoryBank:
    """Bank of a greedy k-center coreset of ``patches`` (any leading shape, last axis = D)."""
    flat = patches.reshape(-1, patches.shape[-1])
    keep, radius = greedy_coreset_radius(flat, coreset_size(len(flat), ratio), seed=seed, progress=progress)
    return MemoryBank(flat[keep], radius)
