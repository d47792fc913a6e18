"""Weighted k-means (plaintext reference): k-means++ seeding and Lloyd iterations on weighted points.

This is the `plain` aggregation, where the server sees the clients' reduced
prototypes. Each Lloyd iteration needs only per-cluster sums of weighted
points and of weights, which is what the secure protocols will compute.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsecmem.protocols.kmeans_party import lloyd_step

__all__ = ["kmeans_pp_init", "weighted_kmeans"]


def kmeans_pp_init(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with probabilities proportional to weight x squared distance."""
    n = len(x)
    first = int(torch.multinomial(w, 1, generator=gen))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        p = w * d2
        if float(p.sum()) <= 0:
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(p, 1, generator=gen))
        centres.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centres)


def weighted_kmeans(points: np.ndarray, weights: np.ndarray, k: int, iters: int = 20,
                    seed: int = 0, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, float]:
    """Centres (k, D), their total weights (k,), and the weighted objective sum w * ||x - c||^2.

    At most ``iters`` centre updates; stops early once an update improves the objective by at
    most ``tol`` (relative). Each pass both scores the current centres and prepares the update.
    """
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64))
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float64))
    if len(x) != len(w) or len(x) == 0:
        raise ValueError("weighted_kmeans: points and weights must be non-empty and of equal length")
    k = min(k, len(x))
    gen = torch.Generator().manual_seed(seed)
    centres = kmeans_pp_init(x, w, k, gen)
    prev = np.inf
    for update in range(iters + 1):
        sums, tot, d2 = lloyd_step(x, w, centres)
        obj = float((w * d2).sum())
        # the first update is always taken; later ones stop when they no longer pay
        if update == iters or (update >= 2 and prev - obj <= tol * max(prev, 1e-12)):
            break
        if update >= 1:
            prev = obj
        centres = torch.where(tot[:, None] > 0, sums / tot.clamp(min=1e-12)[:, None], centres)
    return centres.float().numpy(), tot.float().numpy(), obj
