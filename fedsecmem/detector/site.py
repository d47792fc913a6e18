"""What one site scores with, whatever method trained it: an optional projection of the backbone's
patch embeddings into memory space (FedDyMem's generator), the patch memory banks (its own coreset,
the global memory) and the image-level bank. The run's evaluation, the saved model (``fedsecmem.model``)
and ``fedsecmem predict`` all score through this one object, so a saved model scores a site's test
images exactly as the run did."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedsecmem.detector.backbone import Embeddings
from fedsecmem.detector.memory import MemoryBank
from fedsecmem.detector.scoring import Scores, score_embeddings

__all__ = ["Projection", "SiteDetector", "image_bank_for", "near_items", "patch_banks_for"]


class Projection(Protocol):
    """Maps (..., D) backbone patch features to (..., M) memory-space features (numpy in, numpy out)."""

    def transform(self, patches: np.ndarray) -> np.ndarray: ...


@dataclass
class SiteDetector:
    """``patch_banks``: name -> bank, searched together (a patch's score is its distance to the nearest
    item of any of them); ``image_bank``: the image-level kNN bank (or None)."""

    patch_banks: dict[str, MemoryBank]
    image_bank: MemoryBank | None
    projection: Projection | None = None
    image_k: int = 2
    reweight_k: int = 0

    def memory_space(self, patches: np.ndarray) -> np.ndarray:
        return self.projection.transform(patches) if self.projection is not None else patches

    def score(self, emb: Embeddings) -> Scores:
        """Scores of backbone embeddings ``emb`` (patches (N, h, w, D), images (N, E) or None)."""
        return score_embeddings(Embeddings(self.memory_space(emb.patches), emb.images), list(self.patch_banks.values()),
                                self.image_bank, self.image_k, self.reweight_k)


def near_items(bank: MemoryBank | None, items: np.ndarray, factor: float | None) -> np.ndarray:
    """The rows of ``items`` within ``factor`` covering radii of ``bank`` (``feddymem.global_near``):
    the global items near a site's own normal patches; every row when ``factor`` is None or the bank
    has no radius."""
    if factor is None or bank is None or not bank.radius:
        return items
    return items[bank.nearest_distance(items) <= factor * bank.radius]


def patch_banks_for(local: MemoryBank | None, global_bank: MemoryBank | None, score_with: str) -> dict[str, MemoryBank]:
    """The banks a site scores patches with (``feddymem.score_with``); its own bank alone when there
    is no global memory."""
    banks = {}
    if score_with in ("local", "local+global") or global_bank is None:
        banks["local"] = local
    if score_with in ("global", "local+global") and global_bank is not None:
        banks["global"] = global_bank
    return banks


def image_bank_for(own: MemoryBank | None, joint: MemoryBank | None, score_with: str) -> MemoryBank | None:
    """The image-level bank: the site's own image embeddings, joined with the global image memory
    unless the site scores with its own bank only."""
    return joint if score_with != "local" and joint is not None else own
