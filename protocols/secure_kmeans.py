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
(``kmeans_party``: a ``Request`` answered by a ``KMeansParty``) and what whoever
holds the sums computes (``*_from_sums`` and the drivers here). A driver talks
to the clients through a ``Collective``: ``LocalCollective`` runs the parties in
process over a ``SecureSum`` (the simulator); the network deployment
implements the same interface over gRPC, so both run the same steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedsecmem.protocols.dp_release import SENSITIVITY, NoisySum
from fedsecmem.protocols.kmeans_party import (
    CellStats, KMeansParty, LloydStats, Moments, PartitionStats, Pca, PrivateCells, Request, Split, broadcast_values,
    fix_signs, symmetric,
)
from fedsecmem.protocols.secure_sum import SecureSum, SumOutcome, Traffic
from fedsecmem.protocols.wire import BodyBuilder, encode_request

FLOAT_BYTES = 4  # centres and split plans are broadcast as float32
# A summed cluster weight at or below this is an empty cluster: above CKKS noise (~1e-8 at a 2^40
# scale) and fixed-point rounding (parties * 2^-25), far below any real point's weight.
EMPTY_WEIGHT = 1e-6
# A cluster is split only if its variance along the principal direction exceeds this share of its
# mean squared norm: the variance is E[z^2] - E[z]^2, and the noise of either protocol in that
# difference is about 1e-7 of E[z^2]; a single point (variance 0) must not look splittable.
SPLIT_REL_VARIANCE = 1e-5
# A private release's cell whose noisy weight is under this many noise standard deviations is taken
# for noise (its centre would be noise).
NOISE_DEVIATIONS = 3


# ---- what the holder of a sum computes --------------------------------------------------------

def pca_from_sums(total: np.ndarray, dim: int, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Global mean (D,) and the top ``dims`` principal directions (D, dims) from summed moments."""
    w = total[0]
    mean = total[1 : 1 + dim] / w
    cov = symmetric(total[1 + dim :], dim) / w - np.outer(mean, mean)
    vals, vecs = np.linalg.eigh(cov)
    return mean, fix_signs(vecs[:, ::-1][:, :dims])


def splits_from_sums(total: np.ndarray, n_clusters: int, m: int, k: int) -> list[Split]:
    """Which clusters to split (largest squared error first, until k clusters) and how."""
    cw = total[:n_clusters]
    s1 = total[n_clusters : n_clusters * (1 + m)].reshape(n_clusters, m)
    s2 = symmetric(total[n_clusters * (1 + m) :].reshape(n_clusters, -1), m)
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
            candidates.append((sse, c, mean, fix_signs(vecs[:, -1:])[:, 0]))
    candidates.sort(key=lambda t: -t[0])
    plan = []
    for sse, c, mean, direction in candidates[: max(0, k - n_clusters)]:
        plan.append(Split(c, n_clusters + len(plan), mean, direction))
    return plan


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


class Collective:
    """The clients of one k-means run as the driver sees them: public sizes, and the sum of their
    answers to a request (secure, and noisy when private)."""

    clients: tuple[int, ...]
    dim: int  # dimension of the points
    n_points: int  # points over all clients (public: the number of prototypes)
    cost: AggregateCost

    def total(self, request: Request) -> np.ndarray:
        raise NotImplementedError


class LocalCollective(Collective):
    """In-process parties over a ``SecureSum`` (or a ``NoisySum``): the simulator."""

    def __init__(self, parts: dict[int, tuple[np.ndarray, np.ndarray]], secure_sum: SecureSum | NoisySum):
        self.parties = {c: KMeansParty(*parts[c]) for c in sorted(parts)}
        self.clients = tuple(self.parties)
        dims = {p.dim for p in self.parties.values()}
        if len(dims) != 1:
            raise ValueError(f"federated k-means: clients' points differ in dimension {sorted(dims)}")
        self.dim = dims.pop()
        self.n_points = sum(len(p.x) for p in self.parties.values())
        self.ss = secure_sum
        self.cost = AggregateCost()
        self.broadcasts = secure_sum.name != "ckks"  # with CKKS every client computes the result itself
        self.observer: Callable[[Request, SumOutcome], None] | None = None  # e.g. a leakage measurement

    def total(self, request: Request) -> np.ndarray:
        if self.broadcasts and broadcast_values(request):
            self.cost.broadcast(self.clients, broadcast_values(request))
        tap = self.ss.tap
        if tap is not None:
            data = _Lazy(lambda: encode_request(request, BodyBuilder()).build().SerializeToString(deterministic=True))
            for c in self.clients:
                tap("down", c, f"request:{request.op}", data)
        t = time.perf_counter()
        values = {c: p.answer(request) for c, p in self.parties.items()}
        self.cost.client_seconds += time.perf_counter() - t
        out = self.ss.sum(values)
        self.cost.add(out)
        if self.observer is not None:
            self.observer(request, out)
        return out.total


class _Lazy:
    """Bytes made once, on first call."""

    def __init__(self, make: Callable[[], bytes]):
        self.make, self.value = make, None

    def __call__(self) -> bytes:
        if self.value is None:
            self.value = self.make()
        return self.value


def kmeans_over(col: Collective, k: int, iters: int = 20, tol: float = 1e-6, pca_dims: int = 16) -> KMeansResult:
    """Weighted k-means over the union of the collective's points without pooling them.

    Same stopping rule as the plaintext ``weighted_kmeans``: at most ``iters`` centre updates, stop
    once an update improves the objective by at most ``tol`` (relative)."""
    dim, cost = col.dim, col.cost
    if col.n_points == 0:
        raise ValueError("federated_kmeans: no points")
    k = min(k, col.n_points)
    m = min(pca_dims, dim)

    def held(fn, *args):  # what the holder of the sums computes
        t = time.perf_counter()
        out = fn(*args)
        cost.server_seconds += time.perf_counter() - t
        return out

    # 1. global PCA from securely summed moments
    total = col.total(Moments())
    pca = Pca(*held(pca_from_sums, total, dim, m))
    # 2. partition, one secure sum per level; each request carries the previous level's splits
    n_clusters, splits = 1, ()
    while n_clusters < k:
        total = col.total(PartitionStats(n_clusters, m, pca if n_clusters == 1 else None, splits))
        plan = held(splits_from_sums, total, n_clusters, m, k)
        splits = tuple(plan)
        if not plan:
            break
        n_clusters += len(plan)
    # 3. Lloyd iterations from the partition's means
    total = col.total(CellStats(n_clusters, None, splits))
    centres, weights = centres_from_sums(total, n_clusters, dim, None)
    prev = np.inf
    updates = 0
    for update in range(iters + 1):
        total = col.total(LloydStats(centres))
        new, weights = held(centres_from_sums, total[:-1], len(centres), dim, centres)
        obj = float(total[-1])
        if update == iters or (update >= 2 and prev - obj <= tol * max(prev, 1e-12)):
            break
        if update >= 1:
            prev = obj
        centres = new
        updates += 1
    return KMeansResult(centres, weights, obj, updates, cost)


def federated_kmeans(parts: dict[int, tuple[np.ndarray, np.ndarray]], k: int, secure_sum: SecureSum,
                     iters: int = 20, tol: float = 1e-6, pca_dims: int = 16) -> KMeansResult:
    """``kmeans_over`` the clients' ``(points, weights)`` in process."""
    return kmeans_over(LocalCollective(parts, secure_sum), k, iters, tol, pca_dims)


def secure_weighted_average(values: dict[int, tuple[np.ndarray, float]], secure_sum: SecureSum) -> tuple[np.ndarray, AggregateCost]:
    """(sum_i w_i x_i) / (sum_i w_i) over the clients that made it into the sum."""
    cost = AggregateCost()
    out = secure_sum.sum({c: np.concatenate([np.ravel(x) * w, [w]]) for c, (x, w) in values.items()})
    cost.add(out)
    total = out.total
    if total[-1] <= 0:
        raise ValueError("secure_weighted_average: total weight is not positive")
    return total[:-1] / total[-1], cost


def dp_kmeans_releases(iters: int) -> int:
    """Releases of one private k-means (``dp_kmeans_over``) at most: the mean, the hyperplane cells,
    ``iters`` Lloyd steps. What an accountant calibrates for; each release is charged as it happens."""
    return 2 + iters


def dp_kmeans_over(col: Collective, k: int, z: float, iters: int, clip_norm: float, seed: int) -> KMeansResult:
    """Differentially private federated k-means; ``col`` sums through a noisy sum of multiplier ``z``
    (``protocols.dp_release``).

    Every release is a vector of per-cell (weight, weighted sum) blocks of clipped, unit-scaled
    points, so each has sensitivity sqrt(2) whatever k. A fixed schedule of 2 + ``iters`` releases:
    1. the global mean; 2. the cells of floor(log2 k) random hyperplanes through it (public
    directions drawn from ``seed``: data-independent, unlike PCA, whose covariance would cost a
    release of D^2 noisy values); 3. ``iters`` Lloyd steps. Cells whose noisy weight is below three
    noise standard deviations are dropped (their centres would be noise)."""
    dim = col.dim
    min_weight = max(EMPTY_WEIGHT, NOISE_DEVIATIONS * z * SENSITIVITY)

    def release(req: PrivateCells) -> tuple[np.ndarray, np.ndarray]:
        n_cells = req.cells()
        total = col.total(req)
        weights = total[:n_cells]
        sums = total[n_cells:].reshape(n_cells, dim)
        keep = weights > min_weight
        return sums[keep] / weights[keep][:, None], weights[keep]

    clip = float(clip_norm)
    mean, _ = release(PrivateCells(clip))
    mean = mean[0] if len(mean) else np.zeros(dim)
    levels = max(0, int(np.floor(np.log2(max(k, 1)))))
    centres, weights = release(PrivateCells(clip, "hyperplanes", levels, int(seed), mean=mean))
    for _ in range(iters):
        if len(centres) == 0:
            break
        centres, weights = release(PrivateCells(clip, "nearest", centres=centres))
    if len(centres) == 0:  # everything drowned in noise: the mean is all that is left
        centres, weights = mean[None], np.ones(1)
    return KMeansResult(centres * clip_norm, weights, float("nan"), iters, col.cost)


def dp_federated_kmeans(parts: dict[int, tuple[np.ndarray, np.ndarray]], k: int, noisy: NoisySum, iters: int,
                        clip_norm: float, seed: int) -> KMeansResult:
    """``dp_kmeans_over`` the clients' ``(points, weights)`` in process."""
    return dp_kmeans_over(LocalCollective(parts, noisy), k, noisy.z, iters, clip_norm, seed)
