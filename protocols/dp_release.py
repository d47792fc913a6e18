"""Differentially private releases of secure sums: clipping, sensitivity, and where noise is added.

Sensitivity (privacy unit: one training image). Before any release a client
clips every point to L2 norm C and divides by C, so ||x|| <= 1, and gives
each image a total weight of 1 (its memory-reduce prototypes' weights sum to
1; an image embedding has weight 1). Every DP release is a vector of
per-cell blocks (w_c, sum of w x over the cell's points): the global mean is
one cell, a partition or a Lloyd step has one cell per cluster. Removing one
image removes sum_p w_p (e_c(p) (x) (1, x_p)) from its client's vector, whose
L2 norm is at most sum_p w_p ||(1, x_p)|| <= sqrt(2). So Delta = sqrt(2) for
every release, whatever the number of clusters or patches.

Noise (Gaussian, on the fixed-point lattice, see ``dp_noise``), per release of
noise multiplier z, with sigma = z * Delta in lattice units:
- ``distributed``: each client adds N_Z(0, sigma^2 / (t - 1)); a sum of at
  least t contributions (t = the SecAgg+ threshold, or the configured minimum
  for CKKS; the protocol refuses to reveal a sum of fewer) carries variance
  >= sigma^2 even after any one participant removes its own share: every
  client sees the released global memory and knows its own noise, so the
  target must hold without it. Protects against the aggregator and against
  any single client; a coalition of c clients removes c shares.
- ``local``: each client adds N_Z(0, sigma^2): DP even if the aggregator sees
  every vector (``plain``).
- ``central``: the (trusted) aggregator adds N_Z(0, sigma^2) to the sum.

Each release is one Gaussian mechanism with sampling rate 1 for every client
whose data may be in it, charged (``on_release``) before any client computes
it: write-ahead, so a crash after the data left cannot lose the charge (a
client that then drops out is charged all the same: an upper bound).
``releases`` counts them.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from fedsecmem.protocols.dp_noise import discrete_gaussian, lattice_sensitivity, noised_on_lattice
from fedsecmem.protocols.secure_sum import SecureSum, SumOutcome

SENSITIVITY = math.sqrt(2.0)


def clip_to_unit(points: np.ndarray, clip_norm: float) -> np.ndarray:
    """Scale every row to norm <= ``clip_norm``, then divide by ``clip_norm`` (norm <= 1)."""
    x = np.asarray(points, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12)) / clip_norm


class NoisySum:
    """A ``SecureSum`` whose every call is a Gaussian release of noise multiplier ``z``."""

    def __init__(self, secure_sum: SecureSum, z: float, mode: Literal["distributed", "local", "central"],
                 min_survivors: int, frac_bits: int = 24, on_release=None):
        """``on_release(clients)`` is called before every release with the clients whose data may be
        in it (the accountant records and saves it there and then, before anything leaves)."""
        if mode == "distributed" and min_survivors < 2:
            raise ValueError("distributed noise needs at least 2 contributions (t >= 2)")
        if mode not in ("distributed", "local", "central"):
            raise ValueError(f"noise mode must be distributed, local or central, got {mode!r}")
        if z < 0:
            raise ValueError("noise multiplier must be >= 0")
        self.ss = secure_sum
        self.z = float(z)
        self.mode = mode
        self.min_survivors = int(min_survivors)
        self.frac_bits = frac_bits
        self.releases = 0
        self.name = secure_sum.name
        self.on_release = on_release

    @property
    def tap(self):
        """The wrapped protocol's message tap (the noise is added before anything is sent)."""
        return self.ss.tap

    def sigma_lattice(self, dim: int) -> float:
        return self.z * lattice_sensitivity(SENSITIVITY, self.frac_bits, dim)

    @property
    def need(self) -> int:
        """Contributions a sum must have before it may be revealed (the noise counts on them)."""
        return self.min_survivors if self.mode == "distributed" else 1

    def client_noise(self, vector: np.ndarray) -> np.ndarray:
        """What a client sends for ``vector``: on the fixed-point lattice, with its share of the noise."""
        v = np.asarray(vector, dtype=np.float64)
        sigma = self.sigma_lattice(len(v))
        share = {"distributed": sigma / math.sqrt(self.min_survivors - 1) if self.mode == "distributed" else 0.0,
                 "local": sigma, "central": 0.0}[self.mode]
        return noised_on_lattice(v, share, self.frac_bits)

    def charge(self, clients) -> None:
        """Before a release: every client whose data may be in it is charged (write-ahead)."""
        if self.on_release is not None:
            self.on_release(tuple(sorted(clients)))

    def finish(self, out: SumOutcome) -> SumOutcome:
        """The aggregator's part of a release: central noise where configured."""
        dim = len(out.total)
        sigma = self.sigma_lattice(dim)
        if self.mode == "central" and sigma > 0:
            out.total = out.total + discrete_gaussian(dim, sigma).astype(np.float64) / 2.0**self.frac_bits
        self.releases += 1
        return out

    def sum(self, inputs: dict[int, np.ndarray], drop=None) -> SumOutcome:
        self.charge(inputs)
        noised = {c: self.client_noise(v) for c, v in inputs.items()}
        # the protocol itself refuses to reveal a sum of fewer contributions than the noise counts on
        return self.finish(self.ss.sum(noised, drop, min_included=self.need))
