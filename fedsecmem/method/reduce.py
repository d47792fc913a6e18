"""Memory-reduce: pool each image's patch embeddings into a few weighted prototypes.

Reduction happens within one image only: an image's prototypes depend on
that image alone and their weights sum to 1, so adding or removing one image
changes what a client shares by one image's worth (the bound the DP layer
needs). Prototypes start as averages over a regular grid of blocks and are
refined by a few Lloyd iterations on the image's own patches (batched over
images); a prototype's weight is the share of the image's patches it holds.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["grid_side", "reduce_images"]


def grid_side(n_side: int, ratio: int) -> int:
    """Prototypes per image side when about ``ratio`` patches are pooled into one."""
    return max(1, int(round(n_side / np.sqrt(ratio))))


def reduce_images(patches: np.ndarray, ratio: int, iters: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(N, h, w, D) patches -> prototypes (N, r, D) and weights (N, r), each image's weights sum to 1.

    ``ratio``: about how many patches are pooled into one prototype (1 = no reduction).
    """
    n, h, w, d = patches.shape
    x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))
    if ratio <= 1:
        protos = x.reshape(n, h * w, d)
        return protos.numpy(), np.full((n, h * w), 1.0 / (h * w), np.float32)
    gh, gw = grid_side(h, ratio), grid_side(w, ratio)
    init = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), (gh, gw)).flatten(2).transpose(1, 2)  # (N, r, D)
    flat = x.reshape(n, h * w, d)
    centres = init.clone()
    for _ in range(iters):
        assign = torch.cdist(flat, centres).argmin(-1)  # (N, P)
        onehot = F.one_hot(assign, centres.shape[1]).float()  # (N, P, r)
        counts = onehot.sum(1)  # (N, r)
        sums = onehot.transpose(1, 2) @ flat  # (N, r, D)
        # an empty cluster keeps its previous centre
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres)
    assign = torch.cdist(flat, centres).argmin(-1)
    counts = F.one_hot(assign, centres.shape[1]).float().sum(1)
    weights = counts / (h * w)
    return centres.numpy(), weights.numpy().astype(np.float32)
