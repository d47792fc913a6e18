"""Anomaly scores from memory banks: patch distances, anomaly maps, image scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from fedsecmem.backbone import Embeddings
from fedsecmem.memory import MemoryBank


@dataclass
class Scores:
    """patch: (N, h, w) distances to the nearest memory item; image_patch: max patch score;
    image_knn: mean distance of the image embedding to its k nearest image memories (or None)."""

    patch: np.ndarray
    image_patch: np.ndarray
    image_knn: np.ndarray | None

    def image(self, primary: str) -> np.ndarray:
        if primary == "image":
            if self.image_knn is None:
                raise ValueError("image-level scores need backbone.image_layer")
            return self.image_knn
        return self.image_patch


def score_embeddings(emb: Embeddings, patch_banks: list[MemoryBank], image_bank: MemoryBank | None,
                     image_k: int = 2) -> Scores:
    """Patch score = distance to the nearest item over all ``patch_banks``; image scores from it
    (max) and from the k nearest items of ``image_bank`` (mean)."""
    n, h, w, d = emb.patches.shape
    flat = emb.patches.reshape(-1, d)
    patch = np.minimum.reduce([bank.nearest_distance(flat) for bank in patch_banks]).reshape(n, h, w)
    knn = None
    if image_bank is not None and emb.images is not None:
        knn = image_bank.search(emb.images, image_k)[0].mean(axis=1)
    return Scores(patch, patch.reshape(n, -1).max(axis=1), knn)


def anomaly_maps(patch_scores: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Upsample (N, h, w) patch scores to (N, size, size) and smooth with a Gaussian."""
    t = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32))[:, None]
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    if sigma > 0:
        up = ndimage.gaussian_filter(up, sigma=(0, sigma, sigma), mode="nearest")
    return up
