"""What a client computes for federated k-means on its own points, and the requests that ask for it.

Federated k-means (``secure_kmeans``) is a sequence of secure sums. Each sum is
asked for by a ``Request``: public values from whoever holds the previous sums
(the PCA basis, a split plan, the current centres) and the name of what every
client computes from its own points. A ``KMeansParty`` holds one client's
points and its state between requests (its points' PCA coordinates and
cluster labels) and answers a request with the vector to be summed. The
in-process simulator and the network deployment hand the same requests to the
same parties, so both compute the same global memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedsecmem.protocols.dp_release import clip_to_unit

OPS = ("moments", "partition", "cells", "lloyd", "dp_cells")
DP_ASSIGN = ("all", "hyperplanes", "nearest")


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



@dataclass(frozen=True)
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




# ---- requests ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One secure sum's instructions: ``op`` (what a party computes), small integers and public arrays.

    ops and their fields:
    - ``moments``: no fields.
    - ``partition``: ``n`` clusters; optional ``mean`` (D,) and ``basis`` (D, m) (a new PCA: labels
      restart at 0) and optional splits (``split_cluster``, ``split_child``, ``split_mean``,
      ``split_direction``) applied before computing.
    - ``cells``: ``n`` cells and optional splits, as for ``partition``.
    - ``lloyd``: ``centres`` (k, D).
    - ``dp_cells``: ``assign`` (index into ``DP_ASSIGN``), ``clip`` (float, the DP clip norm), and for
      ``hyperplanes``: ``levels``, ``seed`` and ``mean``; for ``nearest``: ``centres``.
    """

    op: str
    ints: dict[str, int] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    floats: dict[str, float] = field(default_factory=dict)

    def length(self, dim: int) -> int:
        """Length of every party's answer for points of dimension ``dim``."""
        n = self.ints.get("n", 0)
        if self.op == "moments":
            return 1 + dim + dim * (dim + 1) // 2
        if self.op == "partition":
            m = self.ints["m"]
            return n * (1 + m + m * (m + 1) // 2)
        if self.op == "cells":
            return n * (1 + dim)
        if self.op == "lloyd":
            return len(self.arrays["centres"]) * (1 + dim) + 1
        if self.op == "dp_cells":
            return self.cells() * (1 + dim)
        raise ValueError(f"unknown request {self.op!r}")

    def cells(self) -> int:
        """Number of cells of a ``dp_cells`` request."""
        assign = DP_ASSIGN[self.ints["assign"]]
        if assign == "all":
            return 1
        if assign == "hyperplanes":
            return 1 << self.ints["levels"]
        return len(self.arrays["centres"])

    @property
    def broadcast_values(self) -> int:
        """Values the holder of the sums sends every client with this request (float32 each)."""
        return int(sum(a.size for a in self.arrays.values()))


def split_arrays(plan: list[Split]) -> dict[str, np.ndarray]:
    """A split plan as the public arrays of a request."""
    if not plan:
        return {}
    return {"split_cluster": np.array([s.cluster for s in plan], np.int64),
            "split_child": np.array([s.child for s in plan], np.int64),
            "split_mean": np.stack([s.mean for s in plan]),
            "split_direction": np.stack([s.direction for s in plan])}


def _plan_of(arrays: dict[str, np.ndarray]) -> list[Split]:
    if "split_cluster" not in arrays:
        return []
    return [Split(int(c), int(h), m, d) for c, h, m, d in zip(arrays["split_cluster"], arrays["split_child"],
                                                             arrays["split_mean"], arrays["split_direction"])]


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
        a = req.arrays
        if req.op == "moments":
            return local_moments(self.x, self.w)
        if req.op in ("partition", "cells"):
            if "basis" in a:
                self.z = (self.x - a["mean"]) @ a["basis"]
                self.labels = np.zeros(len(self.x), np.int64)
            plan = _plan_of(a)
            if plan:
                if self.z is None:
                    raise ValueError("k-means party: a split plan before any PCA basis")
                self.labels = apply_splits(self.z, self.labels, plan)
            if req.op == "cells":
                return local_cell_stats(self.x, self.w, self.labels, req.ints["n"])
            if self.z is None:
                raise ValueError("k-means party: partition statistics before any PCA basis")
            return local_partition_stats(self.z, self.w, self.labels, req.ints["n"])
        if req.op == "lloyd":
            return local_lloyd_stats(self.x, self.w, a["centres"])
        if req.op == "dp_cells":
            x = self.clipped(req.floats["clip"])
            assign = DP_ASSIGN[req.ints["assign"]]
            if assign == "all":
                labels = np.zeros(len(x), np.int64)
            elif assign == "hyperplanes":
                levels = req.ints["levels"]
                directions = hyperplane_directions(req.ints["seed"], levels, self.dim)
                bits = 1 << np.arange(levels)
                labels = (((x - a["mean"]) @ directions.T > 0) * bits).sum(1).astype(np.int64)
            else:
                labels = torch.cdist(torch.from_numpy(x), torch.from_numpy(a["centres"])).argmin(1).numpy()
            return local_cell_stats(x, self.w, labels, req.cells())
        raise ValueError(f"k-means party: unknown request {req.op!r}")
