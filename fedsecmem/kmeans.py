"""Weighted k-means (plaintext reference): k-means++ seeding and Lloyd iterations on weighted points.

This is the `plain` aggregation, where the server sees the clients' reduced
prototypes. Each Lloyd iteration needs only per-cluster sums of weighted
points and of weights, which is what the secure protocols will compute.
"""

from __future__ import annotations

import numpy as np
import torch


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


def lloyd_step(x: torch.Tensor, w: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Lloyd iteration: (per-cluster weighted sums (k, D), per-cluster weights (k,), assignment)."""
    assign = torch.cdist(x, centres).argmin(1)
    k = len(centres)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, assign, x * w[:, None])
    weights = torch.zeros(k, dtype=x.dtype).index_add_(0, assign, w)
    return sums, weights, assign


def weighted_kmeans(points: np.ndarray, weights: np.ndarray, k: int, iters: int = 20,
                    seed: int = 0, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, float]:
    """Centres (k, D), their total weights (k,), and the weighted objective sum w * ||x - c||^2."""
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64))
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float64))
    if len(x) != len(w) or len(x) == 0:
        raise ValueError("weighted_kmeans: points and weights must be non-empty and of equal length")
    k = min(k, len(x))
    gen = torch.Generator().manual_seed(seed)
    centres = kmeans_pp_init(x, w, k, gen)
    prev = np.inf
    for _ in range(iters):
        sums, tot, _ = lloyd_step(x, w, centres)
        centres = torch.where(tot[:, None] > 0, sums / tot.clamp(min=1e-12)[:, None], centres)
        obj = objective(x, w, centres)
        if prev - obj <= tol * max(prev, 1e-12):
            break
        prev = obj
    _, tot, _ = lloyd_step(x, w, centres)
    return centres.float().numpy(), tot.float().numpy(), objective(x, w, centres)


def objective(x: torch.Tensor, w: torch.Tensor, centres: torch.Tensor) -> float:
    d2 = torch.cdist(x, centres).min(1).values ** 2
    return float((w * d2).sum())
