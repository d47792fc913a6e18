"""2-D Perlin gradient noise (for DRAEM-style anomaly shapes)."""

from __future__ import annotations

import numpy as np

__all__ = ["perlin_2d"]


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_2d(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise of ``shape`` with ``res`` gradient cells per axis, values in about [-1, 1]."""
    ry, rx = res
    cy, cx = -(-shape[0] // ry), -(-shape[1] // rx)  # cell size, rounded up
    h, w = cy * ry, cx * rx
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    gy, gx = yy / cy, xx / cx
    iy, ix = gy.astype(int), gx.astype(int)
    fy, fx = gy - iy, gx - ix
    angles = 2 * np.pi * rng.random((ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)

    def dot(oy: int, ox: int) -> np.ndarray:
        g = grad[iy + oy, ix + ox]
        return g[..., 0] * (fy - oy) + g[..., 1] * (fx - ox)

    uy, ux = _fade(fy), _fade(fx)
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    noise = top * (1 - uy) + bottom * uy
    return (noise * np.sqrt(2))[: shape[0], : shape[1]]
