"""Secure federated weighted k-means and weighted average, built on a ``SecureSum``.

Everything the aggregation needs is a sum over clients:
- a weighted average is (sum w x, sum w);
- one Lloyd iteration is, per cluster, (sum of w x, sum of w), plus the
  clients' summed objective to decide when to stop.

Initialization releases no raw point (k-means++ would pick actual client
prototypes as centres): PCA-partition (Su & Dy 2007), federated.
1. One secure sum of the weighted moments (sum w, sum w x, sum w x x^T) gives
   the global mean and covariance; its top ``pca_dims`` eigenvectors span the
   subspace the partition works in.
2. Level by level, one secure sum of per-cluster moments in that subspace gives
   every cluster's mean, principal direction and squared error; the clusters
   with the largest error are split at their mean along their principal
   direction (each client applies the split to its own points) until there
   are k clusters.
3. The clusters' weighted means seed Lloyd iterations.
So the server (or, with CKKS, the clients) only ever sees per-cluster sums
over all clients, never a point or a single client's statistics.

The functions are split into what a client computes on its own points
(``local_*``) and what whoever holds the sum computes (``*_from_sums``), so
the simulator here and a networked deployment drive the same steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fedsecmem.protocols.dp_release import SENSITIVITY, clip_to_unit
from fedsecmem.protocols.secure_sum import SecureSum, Traffic

FLOAT_BYTES = 4  # centres and split plans are broadcast as float32
# A summed cluster weight at or below this is an empty cluster: above CKKS noise (~1e-8 at a 2^40
# scale) and fixed-point rounding (parties * 2^-25), far below any real point's weight.
EMPTY_WEIGHT = 1e-6
# A cluster is split only if its variance along the principal direction exceeds this share of its
# mean squared norm: the variance is E[z^2] - E[z]^2, and the noise of either protocol in that
# difference is about 1e-7 of E[z^2]; a single point (variance 0) must not look splittable.
SPLIT_REL_VARIANCE = 1e-5


def lloyd_step(x: torch.Tensor, w: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Lloyd pass on one party's points: per-cluster weighted sums (k, D), per-cluster
    weights (k,), and each point's squared distance to its nearest centre (N,)."""
    nearest, assign = torch.cdist(x, centres).min(1)
    k = len(centres)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, assign, x * w[:, None])
    weights = torch.zeros(k, dtype=x.dtype).index_add_(0, assign, w)
    return sums, weights, nearest**2


# ---- what a client computes on its own points -------------------------------------------------

def _upper(m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(m)


def _symmetric(flat_upper: np.ndarray, m: int) -> np.ndarray:
    """Rebuild symmetric (..., m, m) matrices from their upper triangles (..., m(m+1)/2)."""
    iu = _upper(m)
    out = np.zeros(flat_upper.shape[:-1] + (m, m))
    out[..., iu[0], iu[1]] = flat_upper
    out[..., iu[1], iu[0]] = flat_upper
    return out


def _fix_signs(vecs: np.ndarray) -> np.ndarray:
    """Eigenvectors up to sign: make each column's largest entry positive, so every party (and
    every protocol, whose sums differ in the last bits) numbers the clusters the same way."""
    idx = np.abs(vecs).argmax(0)
    return vecs * np.sign(vecs[idx, np.arange(vecs.shape[1])])


def local_moments(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[sum w, sum w x, upper triangle of sum w x x^T] flattened (a symmetric matrix travels once)."""
    wx = x * w[:, None]
    iu = _upper(x.shape[1])
    return np.concatenate([[w.sum()], wx.sum(0), (wx.T @ x)[iu]])


def local_partition_stats(z: np.ndarray, w: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Per cluster, in the PCA subspace: [sum w (c), sum w z (c, m), upper triangle of sum w z z^T
    (c, m(m+1)/2)] flattened."""
    m = z.shape[1]
    iu = _upper(m)
    cw = np.bincount(labels, weights=w, minlength=n_clusters)
    s1 = np.zeros((n_clusters, m))
    np.add.at(s1, labels, z * w[:, None])
    s2 = np.zeros((n_clusters, len(iu[0])))
    np.add.at(s2, labels, (z * w[:, None])[:, iu[0]] * z[:, iu[1]])
    return np.concatenate([cw, s1.ravel(), s2.ravel()])


def local_cell_stats(x: np.ndarray, w: np.ndarray, labels: np.ndarray, n_cells: int) -> np.ndarray:
    """[per-cell weights (c), per-cell weighted sums (c, D)] of the points in cells ``labels``: what a
    differentially private release holds (sensitivity sqrt(2) per image of weight 1 in the unit ball)."""
    lt = torch.from_numpy(labels)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    sums = torch.zeros(n_cells, x.shape[1], dtype=xt.dtype).index_add_(0, lt, xt * wt[:, None])
    weights = torch.zeros(n_cells, dtype=xt.dtype).index_add_(0, lt, wt)
    return np.concatenate([weights.numpy(), sums.numpy().ravel()])


def local_lloyd_stats(x: np.ndarray, w: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[per-cluster weights (k), per-cluster weighted sums (k, D), weighted objective (1)] with every
    point at its nearest centre (the objective lets the holder of the sum decide when to stop)."""
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    sums, weights, d2 = lloyd_step(xt, wt, torch.from_numpy(centres))
    return np.concatenate([weights.numpy(), sums.numpy().ravel(), [float((wt * d2).sum())]])


# ---- what the holder of a sum computes --------------------------------------------------------

def pca_from_sums(total: np.ndarray, dim: int, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Global mean (D,) and the top ``dims`` principal directions (D, dims) from summed moments."""
    w = total[0]
    mean = total[1 : 1 + dim] / w
    cov = _symmetric(total[1 + dim :], dim) / w - np.outer(mean, mean)
    vals, vecs = np.linalg.eigh(cov)
    return mean, _fix_signs(vecs[:, ::-1][:, :dims])


@dataclass(frozen=True)
class Split:
    cluster: int
    child: int
    mean: np.ndarray  # (m,)
    direction: np.ndarray  # (m,)


def splits_from_sums(total: np.ndarray, n_clusters: int, m: int, k: int) -> list[Split]:
    """Which clusters to split (largest squared error first, until k clusters) and how."""
    cw = total[:n_clusters]
    s1 = total[n_clusters : n_clusters * (1 + m)].reshape(n_clusters, m)
    s2 = _symmetric(total[n_clusters * (1 + m) :].reshape(n_clusters, -1), m)
    candidates = []
    for c in range(n_clusters):
        if cw[c] <= EMPTY_WEIGHT:
            continue
        mean = s1[c] / cw[c]
        second = s2[c] / cw[c]
        cov = second - np.outer(mean, mean)
        vals, vecs = np.linalg.eigh(cov)
        sse = float(np.trace(cov) * cw[c])
        if vals[-1] > SPLIT_REL_VARIANCE * max(float(np.trace(second)), 1e-30):
            candidates.append((sse, c, mean, _fix_signs(vecs[:, -1:])[:, 0]))
    candidates.sort(key=lambda t: -t[0])
    plan = []
    for sse, c, mean, direction in candidates[: max(0, k - n_clusters)]:
        plan.append(Split(c, n_clusters + len(plan), mean, direction))
    return plan


def apply_splits(z: np.ndarray, labels: np.ndarray, plan: list[Split]) -> np.ndarray:
    """A client moves its points on the positive side of each split to the new child."""
    labels = labels.copy()
    for s in plan:
        mine = labels == s.cluster
        side = (z[mine] - s.mean) @ s.direction > 0
        idx = np.flatnonzero(mine)[side]
        labels[idx] = s.child
    return labels


def centres_from_sums(cells: np.ndarray, k: int, dim: int, previous: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """New centres from summed cell stats [weights (k), sums (k, D)] (empty clusters keep their
    previous centre) and the cluster weights."""
    weights = np.where(cells[:k] > EMPTY_WEIGHT, cells[:k], 0.0)
    sums = cells[k : k * (1 + dim)].reshape(k, dim)
    fallback = previous if previous is not None else np.zeros((k, dim))
    safe = np.maximum(weights, EMPTY_WEIGHT)[:, None]
    return np.where(weights[:, None] > 0, sums / safe, fallback), weights


# ---- the federated driver ---------------------------------------------------------------------

class AggregateCost(Traffic):
    """The traffic of an aggregation, plus what the holder of the sums broadcasts."""

    def broadcast(self, clients, n_values: int) -> None:
        """The holder of the sum sends ``n_values`` float32 values to every client."""
        for c in clients:
            self.send_down(c, n_values * FLOAT_BYTES)


@dataclass
class KMeansResult:
    centres: np.ndarray  # (k, D)
    weights: np.ndarray  # (k,)
    objective: float  # weighted sum of squared distances of the final assignment
    iterations: int  # Lloyd centre updates
    cost: AggregateCost


def _secure(ss: SecureSum, values: dict[int, np.ndarray], cost: AggregateCost) -> np.ndarray:
    out = ss.sum(values)
    cost.add(out)
    return out.total


def federated_kmeans(parts: dict[int, tuple[np.ndarray, np.ndarray]], k: int, secure_sum: SecureSum,
                     iters: int = 20, tol: float = 1e-6, pca_dims: int = 16) -> KMeansResult:
    """Weighted k-means over the union of the clients' ``(points, weights)`` without pooling them.

    Same stopping rule as the plaintext ``weighted_kmeans``: at most ``iters`` centre updates, stop
    once an update improves the objective by at most ``tol`` (relative)."""
    clients = sorted(parts)
    xs = {c: np.ascontiguousarray(parts[c][0], dtype=np.float64) for c in clients}
    ws = {c: np.ascontiguousarray(parts[c][1], dtype=np.float64) for c in clients}
    dim = next(iter(xs.values())).shape[1]
    n_points = sum(len(x) for x in xs.values())
    if n_points == 0:
        raise ValueError("federated_kmeans: no points")
    k = min(k, n_points)
    m = min(pca_dims, dim)
    cost = AggregateCost()
    server_broadcasts = secure_sum.name != "ckks"  # with CKKS every client computes the result itself

    def step(fn) -> np.ndarray:
        t = time.perf_counter()
        values = {c: fn(c) for c in clients}
        cost.client_seconds += time.perf_counter() - t
        return _secure(secure_sum, values, cost)

    # 1. global PCA from securely summed moments
    total = step(lambda c: local_moments(xs[c], ws[c]))
    t = time.perf_counter()
    mean, basis = pca_from_sums(total, dim, m)
    cost.server_seconds += time.perf_counter() - t
    if server_broadcasts:
        cost.broadcast(clients, dim + dim * m)
    zs = {c: (xs[c] - mean) @ basis for c in clients}
    labels = {c: np.zeros(len(xs[c]), dtype=np.int64) for c in clients}
    # 2. partition, one secure sum per level
    n_clusters = 1
    while n_clusters < k:
        nc = n_clusters
        total = step(lambda c: local_partition_stats(zs[c], ws[c], labels[c], nc))
        t = time.perf_counter()
        plan = splits_from_sums(total, nc, m, k)
        cost.server_seconds += time.perf_counter() - t
        if not plan:
            break
        if server_broadcasts:
            cost.broadcast(clients, len(plan) * (2 + 2 * m))
        t = time.perf_counter()
        labels = {c: apply_splits(zs[c], labels[c], plan) for c in clients}
        cost.client_seconds += time.perf_counter() - t
        n_clusters += len(plan)
    # 3. Lloyd iterations from the partition's means
    n_clusters_final = n_clusters
    total = step(lambda c: local_cell_stats(xs[c], ws[c], labels[c], n_clusters_final))
    centres, weights = centres_from_sums(total, n_clusters_final, dim, None)
    prev = np.inf
    updates = 0
    for update in range(iters + 1):
        if server_broadcasts:
            cost.broadcast(clients, centres.size)
        cur = centres
        total = step(lambda c: local_lloyd_stats(xs[c], ws[c], cur))
        new, weights = centres_from_sums(total[:-1], len(centres), dim, centres)
        obj = float(total[-1])
        if update == iters or (update >= 2 and prev - obj <= tol * max(prev, 1e-12)):
            break
        if update >= 1:
            prev = obj
        centres = new
        updates += 1
    return KMeansResult(centres, weights, obj, updates, cost)


def secure_weighted_average(values: dict[int, tuple[np.ndarray, float]], secure_sum: SecureSum) -> tuple[np.ndarray, AggregateCost]:
    """(sum_i w_i x_i) / (sum_i w_i) over the clients that made it into the sum."""
    cost = AggregateCost()
    total = _secure(secure_sum, {c: np.concatenate([np.ravel(x) * w, [w]]) for c, (x, w) in values.items()}, cost)
    if total[-1] <= 0:
        raise ValueError("secure_weighted_average: total weight is not positive")
    return total[:-1] / total[-1], cost


def dp_federated_kmeans(parts: dict[int, tuple[np.ndarray, np.ndarray]], k: int, noisy, iters: int,
                        clip_norm: float, seed: int) -> KMeansResult:
    """Differentially private federated k-means over a ``NoisySum`` (``protocols.dp_release``).

    Every release is a vector of per-cell (weight, weighted sum) blocks of clipped, unit-scaled
    points, so each has sensitivity sqrt(2) whatever k. A fixed schedule of 2 + ``iters`` releases:
    1. the global mean; 2. the cells of floor(log2 k) random hyperplanes through it (public
    directions drawn from ``seed``: data-independent, unlike PCA, whose covariance would cost a
    release of D^2 noisy values); 3. ``iters`` Lloyd steps. Cells whose noisy weight is below three
    noise standard deviations are dropped (their centres would be noise)."""
    clients = sorted(parts)
    xs = {c: clip_to_unit(parts[c][0], clip_norm) for c in clients}
    ws = {c: np.ascontiguousarray(parts[c][1], dtype=np.float64) for c in clients}
    dim = next(iter(xs.values())).shape[1]
    cost = AggregateCost()
    min_weight = max(EMPTY_WEIGHT, 3 * noisy.z * SENSITIVITY)
    server_broadcasts = noisy.name != "ckks"

    def release(labels: dict[int, np.ndarray], n_cells: int) -> tuple[np.ndarray, np.ndarray]:
        t = time.perf_counter()
        values = {c: local_cell_stats(xs[c], ws[c], labels[c], n_cells) for c in clients}
        cost.client_seconds += time.perf_counter() - t
        total = _secure(noisy, values, cost)
        weights = total[:n_cells]
        sums = total[n_cells:].reshape(n_cells, dim)
        keep = weights > min_weight
        return sums[keep] / weights[keep][:, None], weights[keep]

    mean, _ = release({c: np.zeros(len(xs[c]), np.int64) for c in clients}, 1)
    mean = mean[0] if len(mean) else np.zeros(dim)
    levels = max(0, int(np.floor(np.log2(max(k, 1)))))
    directions = np.random.default_rng(seed).standard_normal((levels, dim))  # public, not secret
    if server_broadcasts:
        cost.broadcast(clients, dim)
    bits = 1 << np.arange(levels)
    labels = {c: (((xs[c] - mean) @ directions.T > 0) * bits).sum(1).astype(np.int64) for c in clients}
    centres, weights = release(labels, 1 << levels)
    for _ in range(iters):
        if len(centres) == 0:
            break
        if server_broadcasts:
            cost.broadcast(clients, centres.size)
        cur = centres
        labels = {c: torch.cdist(torch.from_numpy(xs[c]), torch.from_numpy(cur)).argmin(1).numpy() for c in clients}
        centres, weights = release(labels, len(cur))
    if len(centres) == 0:  # everything drowned in noise: the mean is all that is left
        centres, weights = mean[None], np.ones(1)
    return KMeansResult(centres * clip_norm, weights, float("nan"), iters, cost)
