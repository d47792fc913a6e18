"""What a client computes for federated k-means on its own points, and the requests that ask for it.

Federated k-means (``secure_kmeans``) is a sequence of secure sums. Each sum is
asked for by a request, one frozen type per kind (``Moments``, ``PartitionStats``,
``CellStats``, ``LloydStats``, ``PrivateCells``): the public values from whoever
holds the previous sums (the PCA basis, a split plan, the current centres) that
say what every client computes from its own points. A ``KMeansParty`` holds one client's
points and its state between requests (its points' PCA coordinates and
cluster labels) and answers a request with the vector to be summed. The
in-process simulator and the network deployment hand the same requests to the
same parties, so both compute the same global memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np
import torch

from fedsecmem.protocols.dp_release import clip_to_unit



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


def symmetric(flat_upper: np.ndarray, m: int) -> np.ndarray:
    """Rebuild symmetric (..., m, m) matrices from their upper triangles (..., m(m+1)/2)."""
    iu = _upper(m)
    out = np.zeros(flat_upper.shape[:-1] + (m, m))
    out[..., iu[0], iu[1]] = flat_upper
    out[..., iu[1], iu[0]] = flat_upper
    return out


def fix_signs(vecs: np.ndarray) -> np.ndarray:
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



@dataclass(frozen=True, eq=False)
class Split:
    cluster: int
    child: int
    mean: np.ndarray  # (m,)
    direction: np.ndarray  # (m,)


def apply_splits(z: np.ndarray, labels: np.ndarray, plan: list[Split]) -> np.ndarray:
    """A client moves its points on the positive side of each split to the new child."""
    labels = labels.copy()
    for s in plan:
        mine = labels == s.cluster
        side = (z[mine] - s.mean) @ s.direction > 0
        idx = np.flatnonzero(mine)[side]
        labels[idx] = s.child
    return labels


# ---- requests: one frozen type per kind, dispatched by type ----------------------------------------

@dataclass(frozen=True, eq=False)
class Pca:
    """A new PCA subspace (a party's labels restart at 0): the global mean and the basis."""

    mean: np.ndarray  # (D,)
    basis: np.ndarray  # (D, m)


@dataclass(frozen=True, eq=False)
class Moments:
    """[sum w, sum w x, upper triangle of sum w x x^T]: the global mean and covariance."""

    op: ClassVar[str] = "moments"

    def length(self, dim: int) -> int:
        return 1 + dim + dim * (dim + 1) // 2

    def arrays(self) -> dict[str, np.ndarray]:
        return {}


@dataclass(frozen=True, eq=False)
class PartitionStats:
    """Per-cluster moments in the PCA subspace (``m`` dims) over ``n`` clusters, after applying
    ``splits`` (and a new ``pca`` first, if given)."""

    n: int
    m: int
    pca: Pca | None = None
    splits: tuple[Split, ...] = ()
    op: ClassVar[str] = "partition"

    def length(self, dim: int) -> int:
        return self.n * (1 + self.m + self.m * (self.m + 1) // 2)

    def arrays(self) -> dict[str, np.ndarray]:
        return _pca_arrays(self.pca) | split_arrays(self.splits)


@dataclass(frozen=True, eq=False)
class CellStats:
    """Per-cell (weight, weighted sum) over ``n`` cells after ``splits``: the partition's means."""

    n: int
    pca: Pca | None = None
    splits: tuple[Split, ...] = ()
    op: ClassVar[str] = "cells"

    def length(self, dim: int) -> int:
        return self.n * (1 + dim)

    def arrays(self) -> dict[str, np.ndarray]:
        return _pca_arrays(self.pca) | split_arrays(self.splits)


@dataclass(frozen=True, eq=False)
class LloydStats:
    """One Lloyd pass at ``centres``: per-cluster (weight, weighted sum) and the objective."""

    centres: np.ndarray  # (k, D)
    op: ClassVar[str] = "lloyd"

    def length(self, dim: int) -> int:
        return len(self.centres) * (1 + dim) + 1

    def arrays(self) -> dict[str, np.ndarray]:
        return {"centres": self.centres}


@dataclass(frozen=True, eq=False)
class PrivateCells:
    """A private release: per-cell (weight, weighted sum) of the points clipped to ``clip`` (unit
    scaled), cells by ``assign``: "all" (one cell), "hyperplanes" (``levels`` public random
    hyperplanes from ``seed`` through ``mean``) or "nearest" (the nearest of ``centres``)."""

    clip: float
    assign: str = "all"
    levels: int = 0
    seed: int = 0
    mean: np.ndarray | None = None
    centres: np.ndarray | None = None
    op: ClassVar[str] = "dp_cells"

    def cells(self) -> int:
        if self.assign == "all":
            return 1
        if self.assign == "hyperplanes":
            return 1 << self.levels
        return len(self.centres)

    def length(self, dim: int) -> int:
        return self.cells() * (1 + dim)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in (("mean", self.mean), ("centres", self.centres)) if v is not None}


Request = Union[Moments, PartitionStats, CellStats, LloydStats, PrivateCells]
REQUESTS: dict[str, type] = {t.op: t for t in (Moments, PartitionStats, CellStats, LloydStats, PrivateCells)}
DP_ASSIGN = ("all", "hyperplanes", "nearest")


def broadcast_values(request: Request) -> int:
    """Values the holder of the sums sends every client with ``request`` (float32 each)."""
    return int(sum(np.asarray(a).size for a in request.arrays().values()))


def _pca_arrays(pca: Pca | None) -> dict[str, np.ndarray]:
    return {} if pca is None else {"mean": pca.mean, "basis": pca.basis}


def split_arrays(plan: tuple[Split, ...] | list[Split]) -> dict[str, np.ndarray]:
    """A split plan as the public arrays of a request."""
    if not plan:
        return {}
    return {"split_cluster": np.array([s.cluster for s in plan], np.int64),
            "split_child": np.array([s.child for s in plan], np.int64),
            "split_mean": np.stack([s.mean for s in plan]),
            "split_direction": np.stack([s.direction for s in plan])}


def plan_of(arrays: dict[str, np.ndarray]) -> tuple[Split, ...]:
    """The split plan in a request's public arrays (none: empty)."""
    if "split_cluster" not in arrays:
        return ()
    return tuple(Split(int(c), int(h), m, d) for c, h, m, d in zip(arrays["split_cluster"], arrays["split_child"],
                                                                   arrays["split_mean"], arrays["split_direction"]))


def hyperplane_directions(seed: int, levels: int, dim: int) -> np.ndarray:
    """The public random hyperplanes of private k-means (data-independent, from a public seed)."""
    return np.random.default_rng(seed).standard_normal((levels, dim))


class KMeansParty:
    """One client's points and weights, and its state between the requests of one k-means run."""

    def __init__(self, points: np.ndarray, weights: np.ndarray):
        self.x = np.ascontiguousarray(points, dtype=np.float64)
        self.w = np.ascontiguousarray(weights, dtype=np.float64)
        if self.x.ndim != 2 or self.w.shape != (len(self.x),):
            raise ValueError(f"k-means party: points {self.x.shape} and weights {self.w.shape} do not match")
        self.z: np.ndarray | None = None  # coordinates in the PCA subspace
        self.labels = np.zeros(len(self.x), np.int64)
        self._clipped: dict[float, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def clipped(self, clip: float) -> np.ndarray:
        if clip not in self._clipped:
            self._clipped[clip] = clip_to_unit(self.x, clip)
        return self._clipped[clip]

    def answer(self, req: Request) -> np.ndarray:
        """The vector this party contributes to ``req``'s sum (state updated first where asked)."""
        match req:
            case Moments():
                return local_moments(self.x, self.w)
            case PartitionStats() | CellStats():
                if req.pca is not None:
                    self.z = (self.x - req.pca.mean) @ req.pca.basis
                    self.labels = np.zeros(len(self.x), np.int64)
                if req.splits:
                    if self.z is None:
                        raise ValueError("k-means party: a split plan before any PCA basis")
                    self.labels = apply_splits(self.z, self.labels, list(req.splits))
                if isinstance(req, CellStats):
                    return local_cell_stats(self.x, self.w, self.labels, req.n)
                if self.z is None:
                    raise ValueError("k-means party: partition statistics before any PCA basis")
                return local_partition_stats(self.z, self.w, self.labels, req.n)
            case LloydStats():
                return local_lloyd_stats(self.x, self.w, req.centres)
            case PrivateCells():
                x = self.clipped(req.clip)
                if req.assign == "all":
                    labels = np.zeros(len(x), np.int64)
                elif req.assign == "hyperplanes":
                    directions = hyperplane_directions(req.seed, req.levels, self.dim)
                    bits = 1 << np.arange(req.levels)
                    labels = (((x - req.mean) @ directions.T > 0) * bits).sum(1).astype(np.int64)
                else:
                    labels = torch.cdist(torch.from_numpy(x), torch.from_numpy(req.centres)).argmin(1).numpy()
                return local_cell_stats(x, self.w, labels, req.cells())
        raise ValueError(f"k-means party: unknown request {type(req).__name__}")
