"""Synthetic defects with exact pixel masks.

Every function takes a float image (H, W, 3) in [0, 1] and a seeded
generator and returns ``(defective_image, mask)``. The mask marks exactly
the pixels the defect changed (by more than ``MIN_CHANGE``), so pixel-level
metrics are measured against the truth. Families: Perlin-masked foreign
texture blend (DRAEM), CutPaste scar, scratch, colour stain, local blur.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage
from skimage import draw, transform

from fedsecmem.data.perlin import perlin_2d

__all__ = [
    "DEFECTS", "MAX_TRIES", "MIN_AREA", "MIN_CHANGE", "blur", "cutpaste_scar", "make_defect", "perlin_blend",
    "scratch", "stain",
]

MIN_CHANGE = 2.0 / 255.0  # a pixel counts as changed above this (max over channels)
MIN_AREA = 12  # pixels; smaller defects are redrawn
MAX_TRIES = 20


def _changed(before: np.ndarray, after: np.ndarray, region: np.ndarray) -> np.ndarray:
    return region & (np.abs(after - before).max(axis=-1) > MIN_CHANGE)


def perlin_blend(img: np.ndarray, rng: np.random.Generator, foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend a foreign texture into Perlin-noise blobs covering 3-15% of the image."""
    h, w = img.shape[:2]
    scale = 2 ** int(rng.integers(1, 4))
    noise = perlin_2d((h, w), (scale, scale), rng)
    area = rng.uniform(0.03, 0.15)
    region = noise > np.quantile(noise, 1 - area)
    beta = rng.uniform(0.5, 1.0)
    out = img.copy()
    out[region] = (1 - beta) * img[region] + beta * foreign[region]
    return out, _changed(img, out, region)


def cutpaste_scar(img: np.ndarray, rng: np.random.Generator, foreign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut a thin strip elsewhere in the image, jitter its colour, rotate and paste it."""
    h, w = img.shape[:2]
    sw, sl = int(rng.integers(4, 12)), int(rng.integers(max(16, h // 8), max(24, h // 3)))
    y0, x0 = int(rng.integers(0, h - sl)), int(rng.integers(0, w - sw))
    strip = img[y0 : y0 + sl, x0 : x0 + sw].copy()
    strip = np.clip(strip * rng.uniform(0.7, 1.3, size=3) + rng.uniform(-0.15, 0.15), 0, 1)
    angle = rng.uniform(-45, 45)
    rot = transform.rotate(strip, angle, resize=True, order=1, mode="edge")
    valid = transform.rotate(np.ones(strip.shape[:2]), angle, resize=True, order=0, cval=0.0) > 0.5
    rh, rw = valid.shape
    py, px = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
    out = img.copy()
    region = np.zeros((h, w), bool)
    region[py : py + rh, px : px + rw] = valid
    out[py : py + rh, px : px + rw][valid] = rot[valid]
    return out, _changed(img, out, region)


def scratch(img: np.ndarray, rng: np.random.Generator, foreign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A thin curved line (quadratic Bezier), darker or brighter than its surroundings."""
    h, w = img.shape[:2]
    pts = rng.uniform([0.1 * h, 0.1 * w], [0.9 * h, 0.9 * w], size=(3, 2))
    t = np.linspace(0, 1, 4 * (h + w))[:, None]
    curve = (1 - t) ** 2 * pts[0] + 2 * (1 - t) * t * pts[1] + t**2 * pts[2]
    region = np.zeros((h, w), bool)
    rr = np.clip(np.round(curve[:, 0]).astype(int), 0, h - 1)
    cc = np.clip(np.round(curve[:, 1]).astype(int), 0, w - 1)
    region[rr, cc] = True
    width = int(rng.integers(1, 4))
    if width > 1:
        region = ndimage.binary_dilation(region, iterations=width - 1)
    level = rng.uniform(0.0, 0.15) if img[region].mean() > 0.5 else rng.uniform(0.85, 1.0)
    out = img.copy()
    out[region] = 0.2 * img[region] + 0.8 * level
    return out, _changed(img, out, region)


def _ellipse(shape: tuple[int, int], rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A randomly placed, rotated ellipse with radii between ``lo`` and ``hi`` of the image side."""
    h, w = shape
    ry, rx = rng.uniform(lo, hi, size=2) * np.array([h, w])
    cy, cx = rng.uniform([ry, rx], [h - ry, w - rx])
    rr, cc = draw.ellipse(cy, cx, ry, rx, shape=(h, w), rotation=rng.uniform(0, np.pi))
    region = np.zeros((h, w), bool)
    region[rr, cc] = True
    return region


def stain(img: np.ndarray, rng: np.random.Generator, foreign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A tinted elliptical blot."""
    region = _ellipse(img.shape[:2], rng, 0.04, 0.14)
    colour = rng.uniform(0, 1, size=3)
    alpha = rng.uniform(0.4, 0.7)
    out = img.copy()
    out[region] = (1 - alpha) * img[region] + alpha * colour
    return out, _changed(img, out, region)


def blur(img: np.ndarray, rng: np.random.Generator, foreign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An elliptical region out of focus (strong local Gaussian blur)."""
    region = _ellipse(img.shape[:2], rng, 0.08, 0.2)
    sigma = rng.uniform(2.5, 5.0)
    blurred = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0))
    out = img.copy()
    out[region] = blurred[region]
    return out, _changed(img, out, region)


DEFECTS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "perlin_blend": perlin_blend,
    "cutpaste_scar": cutpaste_scar,
    "scratch": scratch,
    "stain": stain,
    "blur": blur,
}


def make_defect(kind: str, img: np.ndarray, rng: np.random.Generator,
                foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply defect ``kind``; redraw until at least ``MIN_AREA`` pixels changed."""
    fn = DEFECTS[kind]
    for _ in range(MAX_TRIES):
        out, mask = fn(img, rng, foreign)
        if mask.sum() >= MIN_AREA:
            # pixels changed by less than MIN_CHANGE are restored, so the mask is exact
            return np.where(mask[..., None], out, img), mask
    raise RuntimeError(f"defect {kind!r}: could not change {MIN_AREA} pixels in {MAX_TRIES} tries")
