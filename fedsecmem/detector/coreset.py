"""Greedy k-center coreset selection (farthest-point sampling), exact and fast on a CPU.

Each step adds the point farthest from the chosen set and lowers every
point's distance-to-set. The naive step reads all N x D features; we read
far less, with the same result:

* the features are rotated into their PCA basis (distances unchanged);
* a lower bound on ||x - c||^2 costs only ``bound_dim`` dimensions:
  ||P(x - c)||^2 + (||Rx|| - ||Rc||)^2, where P keeps the top components and
  R the rest (triangle inequality on the residual);
* only points whose bound is below their current distance-to-set can change,
  and only those are gathered for the exact distance.

On real patch features the candidates are a few percent of N after the
first steps; on structureless data (where bounds do not prune) the step
falls back to one dense matrix-vector product. Squared distances use
precomputed norms (||x||^2 - 2 x.c + ||c||^2), never an (N, D) temporary.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "BOUND_DIM", "DENSE_FRACTION", "coreset_size", "greedy_coreset", "greedy_coreset_radius", "pca_rotate",
]

BOUND_DIM = 32  # PCA dims used for the lower bound (speed only; the result is exact)
DENSE_FRACTION = 0.15  # above this share of candidates, a dense pass is cheaper than a gather
# The greedy steps run on one thread: a step is a handful of small vector operations, and on a
# 2-core machine a second thread mostly waits (and stalls when the other core is busy).


def pca_rotate(x: torch.Tensor) -> torch.Tensor:
    """Centre ``x`` and rotate it into its PCA basis (components by decreasing variance)."""
    xc = x - x.mean(0)
    cov = (xc.T @ xc).double() / len(x)
    evals, evecs = torch.linalg.eigh(cov)
    basis = evecs[:, torch.argsort(evals, descending=True)].float()
    return (xc @ basis).contiguous()


def greedy_coreset(features: np.ndarray | torch.Tensor, n_select: int, seed: int = 0,
                   start: int | None = None, bound_dim: int = BOUND_DIM, progress=None) -> np.ndarray:
    """Indices of ``n_select`` rows chosen by greedy k-center (farthest-point) selection.

    ``start``: the first index (default: drawn from ``seed``).
    """
    return greedy_coreset_radius(features, n_select, seed, start, bound_dim, progress)[0]


def greedy_coreset_radius(features: np.ndarray | torch.Tensor, n_select: int, seed: int = 0,
                          start: int | None = None, bound_dim: int = BOUND_DIM,
                          progress=None) -> tuple[np.ndarray, float]:
    """``greedy_coreset``'s indices and the covering radius they reach: the largest distance from
    any row to its nearest chosen row (0 when every row is chosen)."""
    x = torch.as_tensor(np.ascontiguousarray(features) if isinstance(features, np.ndarray) else features)
    x = x.float().reshape(len(x), -1)
    n, d = x.shape
    if n_select <= 0:
        raise ValueError("n_select must be positive")
    if n_select >= n:
        return np.arange(n), 0.0
    xr = pca_rotate(x)
    b = max(1, min(bound_dim, d))
    low = xr[:, :b].contiguous()
    sq_low = (low * low).sum(1)
    res_norm = xr[:, b:].norm(dim=1) if b < d else torch.zeros(n)
    sq = (xr * xr).sum(1)
    if start is None:
        start = int(np.random.default_rng(seed).integers(n))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the note at DENSE_FRACTION
    try:
        return _select(xr, low, sq_low, res_norm, sq, n_select, start, progress)
    finally:
        torch.set_num_threads(threads)


def _select(xr: torch.Tensor, low: torch.Tensor, sq_low: torch.Tensor, res_norm: torch.Tensor, sq: torch.Tensor,
            n_select: int, start: int, progress) -> np.ndarray:
    """The greedy steps of ``greedy_coreset`` on PCA-rotated features; also the covering radius."""
    n = len(xr)
    chosen = np.empty(n_select, dtype=np.int64)
    mind = torch.full((n,), float("inf"))
    bound = torch.empty(n)
    dense = torch.empty(n)
    idx = start
    for step in range(n_select):
        chosen[step] = idx
        c = xr[idx]
        if step == 0:
            cand = None  # every point changes on the first step
        else:
            torch.mv(low, low[idx], out=bound)
            bound.mul_(-2.0).add_(sq_low).add_(sq_low[idx]).add_((res_norm - res_norm[idx]).square_())
            cand = torch.nonzero(bound < mind).squeeze(1)
        if cand is None or cand.numel() > DENSE_FRACTION * n:
            torch.mv(xr, c, out=dense)
            dense.mul_(-2.0).add_(sq).add_(sq[idx])
            torch.minimum(mind, dense, out=mind)
        elif cand.numel():
            dist = (xr[cand] @ c).mul_(-2.0).add_(sq[cand]).add_(sq[idx])
            mind[cand] = torch.minimum(mind[cand], dist)
        mind[idx] = -1.0  # chosen: never picked again
        idx = int(torch.argmax(mind))
        if progress is not None:
            progress(1)
    return chosen, float(np.sqrt(max(float(mind[idx]), 0.0)))


def coreset_size(n: int, ratio: float, minimum: int = 1) -> int:
    """How many items a coreset ``ratio`` of ``n`` keeps (at least ``minimum``, at most n)."""
    return int(min(n, max(minimum, round(n * ratio))))
