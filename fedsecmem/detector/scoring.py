"""Anomaly scores from memory banks: patch distances, anomaly maps, image scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from fedsecmem.detector.backbone import Embeddings
from fedsecmem.detector.memory import MemoryBank

__all__ = ["Scores", "anomaly_maps", "reweighted_max", "score_embeddings"]


@dataclass
class Scores:
    """patch: (N, h, w) distances to the nearest memory item; image_patch: max patch score
    (optionally PatchCore's re-weighted max);
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


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reweighted_max(patches: np.ndarray, patch: np.ndarray, banks: list[MemoryBank], k: int) -> np.ndarray:
    """PatchCore's image score (Roth et al. 2022, eq. 7, as anomalib computes it): the largest
    patch distance s* = ||p* - m*|| scaled by ``1 - softmax(d)_0``, where d are the distances from
    p* to m* and to m*'s ``k - 1`` nearest neighbours in its memory bank: a max patch whose nearest
    item sits in a sparse region of the memory counts more than one in a dense region.

    patches: (N, P, D) embeddings; patch: (N, P) their distances to the nearest item of ``banks``."""
    n = len(patch)
    top = patch.argmax(axis=1)
    feats = np.ascontiguousarray(patches[np.arange(n), top], dtype=np.float32)
    found = [bank.search(feats, 1) for bank in banks]
    which = np.argmin(np.stack([f[0][:, 0] for f in found]), axis=0)  # bank holding m*
    out = np.empty(n, np.float64)
    for b, bank in enumerate(banks):
        rows = np.flatnonzero(which == b)
        if not rows.size:
            continue
        if len(bank) < 2:  # no neighbours to weigh against: the plain max (1 - softmax would be 0)
            out[rows] = patch[rows, top[rows]]
            continue
        nearest = bank.items[found[b][1][rows, 0]]
        _, support = bank.search(nearest, min(k, len(bank)))  # m* itself first, then its neighbours
        dist = np.linalg.norm(feats[rows, None, :] - bank.items[support], axis=2)
        out[rows] = (1.0 - _softmax(dist)[:, 0]) * patch[rows, top[rows]]
    return out


def score_embeddings(emb: Embeddings, patch_banks: list[MemoryBank], image_bank: MemoryBank | None,
                     image_k: int = 2, reweight_k: int = 0) -> Scores:
    """Patch score = distance to the nearest item over all ``patch_banks``; image scores from it
    (max, or PatchCore's re-weighted max when ``reweight_k > 1``) and from the k nearest items of
    ``image_bank`` (mean)."""
    n, h, w, d = emb.patches.shape
    if n == 0:  # a client without test images: nothing to score
        return Scores(np.zeros((0, h, w), np.float32), np.zeros(0, np.float32),
                      np.zeros(0, np.float32) if image_bank is not None and emb.images is not None else None)
    flat = emb.patches.reshape(-1, d)
    patch = np.minimum.reduce([bank.nearest_distance(flat) for bank in patch_banks]).reshape(n, h, w)
    knn = None
    if image_bank is not None and emb.images is not None:
        knn = image_bank.search(emb.images, image_k)[0].mean(axis=1)
    if reweight_k > 1:
        image = reweighted_max(emb.patches.reshape(n, h * w, d), patch.reshape(n, -1), patch_banks, reweight_k)
    else:
        image = patch.reshape(n, -1).max(axis=1)
    return Scores(patch, image, knn)


def anomaly_maps(patch_scores: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Upsample (N, h, w) patch scores to (N, size, size) and smooth with a Gaussian."""
    t = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32))[:, None]
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    if sigma > 0:
        up = ndimage.gaussian_filter(up, sigma=(0, sigma, sigma), mode="nearest")
    return up
