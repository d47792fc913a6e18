"""The embedded textures benchmark: real CC0 images bundled with scikit-image.

Each source image is one "product". Training images are random crops (with
mild augmentation) from the top part of the source; test crops come from the
held-out bottom part, so no test pixel was seen in training. Half the test
crops get a synthetic defect with an exact pixel mask (``defects``).
Everything is deterministic from the seed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from skimage import data as skdata
from skimage import transform

from fedsecmem.data.defects import make_defect
from fedsecmem.data.types import Benchmark, ImageSet

__all__ = ["JITTER", "SOURCES", "TEST_FRACTION", "load_source", "make_textures"]

TEST_FRACTION = 0.4  # bottom share of each source kept for test crops
JITTER = 0.1  # mild brightness/contrast augmentation of training crops


def _retina() -> np.ndarray:
    img = skdata.retina()  # fundus photograph; keep the inside of the disc
    img = transform.rescale(img, 0.5, channel_axis=-1, anti_aliasing=True)
    h, w = img.shape[:2]
    s = int(0.3 * h)
    return img[h // 2 - s : h // 2 + s, w // 2 - s : w // 2 + s]


SOURCES = {
    "brick": skdata.brick,
    "grass": skdata.grass,
    "gravel": skdata.gravel,
    "retina": _retina,
    "immunohistochemistry": skdata.immunohistochemistry,
    "cell": skdata.cell,  # light microscopy of a cell culture
}


@lru_cache(maxsize=None)
def load_source(name: str) -> np.ndarray:
    """Source image as float (H, W, 3) in [0, 1]."""
    img = np.asarray(SOURCES[name]())
    if img.dtype == np.uint8:
        img = img.astype(np.float64) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _fits(h: int, crop: int) -> bool:
    return h - max(crop, int(TEST_FRACTION * h)) >= crop


def _regions(h: int, crop: int) -> tuple[tuple[int, int], tuple[int, int]]:
    split = h - max(crop, int(TEST_FRACTION * h))
    if split < crop:
        raise ValueError(f"crop size {crop} too large for a source of height {h}")
    return (0, split), (split, h)


def _crop(src: np.ndarray, rows: tuple[int, int], crop: int, rng: np.random.Generator) -> np.ndarray:
    y = int(rng.integers(rows[0], rows[1] - crop + 1))
    x = int(rng.integers(0, src.shape[1] - crop + 1))
    return src[y : y + crop, x : x + crop]


def _augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.5:
        img = img[::-1]
    gain = rng.uniform(1 - JITTER, 1 + JITTER)
    bias = rng.uniform(-JITTER / 2, JITTER / 2)
    mean = img.mean()
    return np.clip((img - mean) * gain + mean + bias, 0, 1)


def _to_uint8(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] != size:
        img = transform.resize(img, (size, size), order=1, anti_aliasing=True)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape[0] == size:
        return mask
    return transform.resize(mask.astype(float), (size, size), order=0) > 0.5


def make_textures(products: list[str], train_per_product: int, test_normal_per_product: int,
                  test_defect_per_product: int, defects: list[str], crop_size: int,
                  image_size: int, seed: int) -> Benchmark:
    """Build the textures benchmark (train: normal crops; test: normal + defective crops)."""
    tr_imgs, tr_prod = [], []
    te_imgs, te_masks, te_prod, te_kinds = [], [], [], []
    for pi, name in enumerate(products):
        src = load_source(name)
        train_rows, test_rows = _regions(src.shape[0], crop_size)
        rng = np.random.default_rng([seed, pi, 0])
        for _ in range(train_per_product):
            tr_imgs.append(_to_uint8(_augment(_crop(src, train_rows, crop_size, rng), rng), image_size))
            tr_prod.append(pi)
        rng = np.random.default_rng([seed, pi, 1])
        for _ in range(test_normal_per_product):
            te_imgs.append(_to_uint8(_crop(src, test_rows, crop_size, rng), image_size))
            te_masks.append(np.zeros((image_size, image_size), bool))
            te_prod.append(pi)
            te_kinds.append("good")
        others = [p for p in SOURCES if p != name and _fits(load_source(p).shape[0], crop_size)]
        if not others:
            raise ValueError(f"crop size {crop_size} too large for every foreign texture source")
        for j in range(test_defect_per_product):
            kind = defects[j % len(defects)]
            base = _crop(src, test_rows, crop_size, rng)
            fsrc = load_source(others[int(rng.integers(len(others)))])
            foreign = _crop(fsrc, _regions(fsrc.shape[0], crop_size)[1], crop_size, rng)
            img, mask = make_defect(kind, base, rng, foreign)
            te_imgs.append(_to_uint8(img, image_size))
            te_masks.append(_resize_mask(mask, image_size))
            te_prod.append(pi)
            te_kinds.append(kind)
    train = ImageSet(np.stack(tr_imgs), np.zeros(len(tr_imgs), np.int64), np.array(tr_prod),
                     ["good"] * len(tr_imgs), list(products))
    labels = np.array([0 if k == "good" else 1 for k in te_kinds])
    test = ImageSet(np.stack(te_imgs), labels, np.array(te_prod), te_kinds, list(products),
                    masks=np.stack(te_masks))
    return Benchmark("textures", train, test, {"defects": list(defects), "crop_size": crop_size})
