"""Gaussian noise for released sums: exact discrete Gaussian on the fixed-point lattice.

Floating-point Gaussian samplers leak through the pattern of representable
outputs (Mironov 2012 for Laplace; the same holds for Gaussians), so noise is
never drawn as a float here. A released vector is first put on the lattice
2^-frac_bits Z (the same fixed-point grid SecAgg+ masks), then integer noise
from the discrete Gaussian N_Z(0, s^2) is added. The sampler is OpenDP's exact
CKS20 sampler (Canonne, Kamath, Steinke 2020) drawing its bits from OpenSSL's
CSPRNG: no float in the sampling path, no numpy RNG.

Sensitivity on the lattice: rounding each coordinate to the grid can move two
neighbouring vectors apart by up to one grid step per coordinate, so an L2
sensitivity Delta in real units becomes Delta * 2^f + sqrt(d) in grid units;
the noise scale is the noise multiplier times that.
"""

from __future__ import annotations

import math

import numpy as np
import opendp.prelude as dp

dp.enable_features("contrib")

_SAMPLERS: dict[float, object] = {}


def discrete_gaussian(n: int, sigma: float) -> np.ndarray:
    """``n`` independent draws of N_Z(0, sigma^2) (sigma in lattice units) as int64."""
    if n == 0 or sigma == 0:
        return np.zeros(n, dtype=np.int64)
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"noise scale must be positive and finite, got {sigma}")
    if sigma not in _SAMPLERS:
        _SAMPLERS[sigma] = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T="i64")),
                                              dp.l2_distance(T="i64"), scale=float(sigma))
    return np.asarray(_SAMPLERS[sigma]([0] * n), dtype=np.int64)


def lattice_sensitivity(delta: float, frac_bits: int, dim: int) -> float:
    """L2 sensitivity in grid units of a vector with real-valued sensitivity ``delta``."""
    return delta * 2.0**frac_bits + math.sqrt(dim)


def noised_on_lattice(x: np.ndarray, sigma_lattice: float, frac_bits: int) -> np.ndarray:
    """``x`` rounded to the 2^-frac_bits grid plus discrete Gaussian noise, returned as float64
    values that are exact multiples of the grid step (so a later fixed-point encoding with the
    same ``frac_bits`` recovers the noised integers exactly)."""
    scale = 2.0**frac_bits
    q = np.rint(np.asarray(x, dtype=np.float64).ravel() * scale).astype(np.int64)
    q += discrete_gaussian(q.size, sigma_lattice)
    if np.abs(q).max(initial=0) >= 2**53:
        raise OverflowError("noised value leaves float64's exact integer range; lower frac_bits")
    return q.astype(np.float64) / scale
