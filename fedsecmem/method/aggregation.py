"""How a round's client contributions become the global result, under the configured protocol.

- FedDyMem's global memory: ``plain`` with k-means++ seeding is the faithful
  FedDyMem mode (clients upload their reduced memories; the server runs
  weighted k-means on them). Every other combination runs federated weighted
  k-means with the PCA-partition seeding (``fedsecmem.protocols.secure_kmeans``)
  over the protocol's secure sum, so the server sees per-cluster sums only
  (``secagg``) or nothing (``ckks``: clients decrypt the sums themselves).
- FedAvg/FedProx: the weighted average of the generator's parameters is a
  secure weighted average over the same secure sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from fedsecmem.crypto.ckks import CkksParams
from fedsecmem.method.client import FLOAT_BYTES, Contribution, GlobalMemory
from fedsecmem.method.kmeans import weighted_kmeans
from fedsecmem.privacy.budget import secagg_threshold
from fedsecmem.protocols.dp_release import NoisySum
from fedsecmem.protocols.secure_kmeans import (
    AggregateCost, Collective, KMeansResult, LocalCollective, dp_kmeans_over, kmeans_over, secure_weighted_average,
)
from fedsecmem.protocols.kmeans_party import Request
from fedsecmem.protocols.secure_sum import SecureSum, SumOutcome, make_secure_sum

__all__ = [
    "Aggregated", "RoundInfo", "aggregation_summary", "average_states", "collective_aggregator",
    "global_memory_over", "kmeans_for", "make_aggregator", "secure_sum_for", "upload_kmeans_aggregator",
]


def aggregation_summary(cfg, init: str | None, dp_noise: str | None = None) -> dict:
    """results.json's ``aggregation``: protocol, seeding, noise placement and protocol settings."""
    out = {"protocol": cfg.protocol, "kmeans_init": init}
    if dp_noise is not None:
        out["dp_noise"] = dp_noise
    if cfg.protocol == "secagg":
        out["secagg"] = cfg.secure.secagg.model_dump()
    elif cfg.protocol == "ckks":
        out["ckks"] = cfg.secure.ckks.model_dump()
    return out


@dataclass
class RoundInfo:
    """What an aggregation reports besides its result: the public part goes into the round's record
    (results.json ``per_round``), the seconds into the run's timings."""

    secure_sums: int = 0
    global_items: int | None = None
    kmeans_objective: float | None = None  # federated or faithful k-means (private k-means releases none)
    kmeans_updates: int | None = None
    client_s: float | None = None  # seconds the clients computed
    server_s: float | None = None  # seconds the holder of the sums computed

    def record(self) -> dict:
        """The fields of the round's record (those that apply)."""
        return {k: v for k, v in (("secure_sums", self.secure_sums), ("kmeans_objective", self.kmeans_objective),
                                  ("kmeans_updates", self.kmeans_updates), ("global_items", self.global_items))
                if v is not None}


@dataclass
class Aggregated:
    """A round's aggregation: its result, what each client sent and received, and its cost."""

    memory: GlobalMemory | None
    bytes_up: list[int]
    bytes_down: list[int]
    info: RoundInfo = field(default_factory=RoundInfo)


Aggregator = Callable[[list[Contribution]], Aggregated]


def secure_sum_for(cfg, plain_wire: str = "float64") -> SecureSum:
    """The configured protocol's secure sum (one per run: CKKS keys are made once). ``plain`` sums
    travel as ``plain_wire``: float64 for k-means statistics (second moments lose too much in
    float32), float32 for model parameters."""
    s = cfg.secure
    if cfg.protocol == "secagg":
        a = s.secagg
        # the run's t for every instance, also one over fewer participants (what each client enforces)
        return make_secure_sum("secagg", bits=a.bits, frac_bits=a.frac_bits, neighbours=a.neighbours,
                               threshold=secagg_threshold(cfg), rounding=a.rounding)
    if cfg.protocol == "ckks":
        c = s.ckks
        return make_secure_sum("ckks", params=CkksParams(c.poly_modulus_degree, tuple(c.coeff_mod_bit_sizes),
                                                         c.scale_bits))
    return make_secure_sum("plain", wire=plain_wire)


def upload_kmeans_aggregator(k: int, k_images: int, iters: int, seed: int) -> Aggregator:
    """Faithful FedDyMem: the server receives every client's prototypes and runs k-means++ and Lloyd."""

    def aggregate(contribs: list[Contribution]) -> Aggregated:
        pts = np.concatenate([c.prototypes for c in contribs])
        w = np.concatenate([c.weights for c in contribs])
        patches, _, objective = weighted_kmeans(pts, w, k, iters, seed)
        images = None
        if all(c.images is not None for c in contribs):
            imgs = np.concatenate([c.images for c in contribs])
            images, _, _ = weighted_kmeans(imgs, np.ones(len(imgs)), k_images, iters, seed + 1)
        memory = GlobalMemory(patches, images)
        return Aggregated(memory, [c.nbytes for c in contribs], [memory.nbytes] * len(contribs),
                          RoundInfo(secure_sums=0, kmeans_objective=objective))

    return aggregate


KMeansOver = Callable[[Collective, bool], KMeansResult]


def kmeans_for(cfg, z: float | None = None) -> KMeansOver:
    """The configured federated k-means on a collective, ``(collective, images) -> result``: private
    (fixed schedule, clipped points) when ``z`` is given, else PCA-partition seeded Lloyd."""
    fc, pv = cfg.feddymem, cfg.privacy
    if z is not None:
        return lambda col, images: dp_kmeans_over(
            col, fc.global_k_images if images else fc.global_k, z, pv.kmeans_iters,
            pv.image_clip_norm if images else pv.clip_norm, cfg.seed + int(images))
    return lambda col, images: kmeans_over(col, fc.global_k_images if images else fc.global_k, fc.kmeans_iters,
                                           pca_dims=cfg.secure.pca_dims)


def global_memory_over(kmeans: KMeansOver, patches: Collective,
                       images: Callable[[], Collective] | None) -> tuple[GlobalMemory, AggregateCost, RoundInfo]:
    """The global memory from federated k-means on the patch prototypes and, when every client
    shares them, on the image embeddings (weight 1 each; ``images`` makes their collective once the
    patches are done, from the clients still there): the memory, its cost, the round's info."""
    cost = AggregateCost()
    res = kmeans(patches, False)
    cost.merge(res.cost)
    image_centres = None
    if images is not None:
        img = kmeans(images(), True)
        cost.merge(img.cost)
        image_centres = img.centres.astype(np.float32)
    info = RoundInfo(secure_sums=cost.sums, global_items=len(res.centres), client_s=cost.client_seconds,
                     server_s=cost.server_seconds)
    if np.isfinite(res.objective):  # private k-means releases no objective
        info.kmeans_objective, info.kmeans_updates = res.objective, res.iterations
    return GlobalMemory(res.centres.astype(np.float32), image_centres), cost, info


SumObserver = Callable[[str, Request, SumOutcome], None]  # ("patches" | "images", request, outcome)


def collective_aggregator(kmeans: KMeansOver, ss: SecureSum | NoisySum, observer: SumObserver | None = None) -> Aggregator:
    """Federated k-means over the secure (or noisy) sum, clients simulated in process: the
    aggregator never holds a prototype. ``observer`` sees every sum (a leakage measurement)."""

    def observed(col: LocalCollective, which: str) -> LocalCollective:
        if observer is not None:
            col.observer = lambda request, out: observer(which, request, out)
        return col

    def aggregate(contribs: list[Contribution]) -> Aggregated:
        patches = observed(LocalCollective({i: (c.prototypes, c.weights) for i, c in enumerate(contribs)}, ss),
                           "patches")
        images = None
        if all(c.images is not None for c in contribs):
            images = lambda: observed(LocalCollective({i: c.image_points() for i, c in enumerate(contribs)}, ss),
                                      "images")
        memory, cost, info = global_memory_over(kmeans, patches, images)
        n = len(contribs)
        return Aggregated(memory, [cost.bytes_up.get(i, 0) for i in range(n)],
                          [cost.bytes_down.get(i, 0) for i in range(n)], info)

    return aggregate


def make_aggregator(cfg, ss: SecureSum, noisy: NoisySum | None = None,
                    observer: SumObserver | None = None) -> Aggregator:
    """The round's aggregation: private k-means when a ``NoisySum`` is given, else as configured."""
    fc = cfg.feddymem
    if noisy is not None:
        return collective_aggregator(kmeans_for(cfg, noisy.z), noisy, observer)
    if cfg.kmeans_init == "kmeans++":
        return upload_kmeans_aggregator(fc.global_k, fc.global_k_images, fc.kmeans_iters, cfg.seed)
    return collective_aggregator(kmeans_for(cfg), ss, observer)


def average_states(states: list[dict], weights: list[float], ss: SecureSum) -> tuple[dict, Aggregated]:
    """Weighted average of parameter dicts through the secure sum (plain: in the clear)."""
    keys = list(states[0])
    flat = {i: (np.concatenate([s[k].detach().cpu().numpy().ravel().astype(np.float64) for k in keys]), float(w))
            for i, (s, w) in enumerate(zip(states, weights))}
    avg, cost = secure_weighted_average(flat, ss)
    out, pos = {}, 0
    for k in keys:
        ref = states[0][k]
        out[k] = torch.from_numpy(avg[pos : pos + ref.numel()].reshape(tuple(ref.shape))).to(ref.dtype)
        pos += ref.numel()
    n = len(states)
    model_bytes = pos * FLOAT_BYTES
    return out, Aggregated(None, [cost.bytes_up.get(i, 0) for i in range(n)],
                           [model_bytes] * n,  # the new global model, sent back to every client
                           RoundInfo(secure_sums=cost.sums, client_s=cost.client_seconds,
                                     server_s=cost.server_seconds))
