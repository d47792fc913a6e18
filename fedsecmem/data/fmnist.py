"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or any folder of its idx files).

Two protocols: FMNIST-6/4 (normal classes spread over clients as products,
anomalies = the other classes) and the classic one-vs-rest.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from skimage import transform

from fedsecmem.data.types import Benchmark, ImageSet
from fedsecmem.errors import UserError

__all__ = ["CLASS_NAMES", "DEBIAN_DIR", "FILES", "load_fmnist", "make_fmnist", "make_fmnist_ovr"]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle-boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"data.root: cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or len(raw) < 4 + 4 * raw[3]:
        raise UserError(f"data.root: {path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"data.root: {path} is truncated ({body.size} of {int(np.prod(dims))} bytes)")
    return body.reshape(dims)


def load_fmnist(root: Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of ``split`` ('train' or 'test')."""
    folder = Path(root) if root is not None else DEBIAN_DIR
    paths = []
    for name in FILES[split]:
        p = folder / name
        if not p.exists() and (folder / name[:-3]).exists():
            p = folder / name[:-3]
        if not p.exists():
            raise UserError(
                f"data.root: Fashion-MNIST file {name} not found in {folder} "
                "(install the Debian package dataset-fashion-mnist, or set data.root)"
            )
        paths.append(p)
    images, labels = _read_idx(paths[0]), _read_idx(paths[1])
    if images.ndim != 3 or len(images) != len(labels):
        raise UserError(f"data.root: {paths[0]} and {paths[1]} do not match")
    return images, labels


def _to_rgb(images: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        r = transform.resize(img, (size, size), order=1, preserve_range=True, anti_aliasing=False)
        out[i] = np.round(r).astype(np.uint8)[..., None]
    return out


def _pick(labels: np.ndarray, cls: int, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(labels == cls)
    return np.sort(rng.choice(idx, size=min(n, idx.size), replace=False))


def make_fmnist(normal_classes: list[int], anomaly_classes: list[int], train_per_class: int,
                test_per_class: int, image_size: int, seed: int, root: Path | None = None,
                name: str = "fmnist") -> Benchmark:
    """Normal classes are the products; test = held-out normals + anomaly classes."""
    x_tr, y_tr = load_fmnist(root, "train")
    x_te, y_te = load_fmnist(root, "test")
    rng = np.random.default_rng([seed, 7])
    tr_idx = [_pick(y_tr, c, train_per_class, rng) for c in normal_classes]
    te_norm = [_pick(y_te, c, test_per_class, rng) for c in normal_classes]
    n_anom = max(1, test_per_class * len(normal_classes) // max(1, len(anomaly_classes)))
    te_anom = [_pick(y_te, c, n_anom, rng) for c in anomaly_classes]
    products = [CLASS_NAMES[c] for c in normal_classes]
    tr_all = np.concatenate(tr_idx)
    train = ImageSet(
        _to_rgb(x_tr[tr_all], image_size), np.zeros(tr_all.size, np.int64),
        np.concatenate([np.full(i.size, p) for p, i in enumerate(tr_idx)]),
        ["good"] * tr_all.size, products,
    )
    te_all = np.concatenate(te_norm + te_anom)
    # anomalies carry no product; they are dealt to clients separately (product -1)
    te_prod = np.concatenate([np.full(i.size, p) for p, i in enumerate(te_norm)]
                             + [np.full(i.size, -1) for i in te_anom])
    kinds = ["good"] * sum(i.size for i in te_norm) + [
        CLASS_NAMES[c] for c, i in zip(anomaly_classes, te_anom) for _ in range(i.size)
    ]
    labels = np.array([0 if k == "good" else 1 for k in kinds])
    test = ImageSet(_to_rgb(x_te[te_all], image_size), labels, te_prod, kinds, products)
    info = {"normal_classes": list(normal_classes), "anomaly_classes": list(anomaly_classes)}
    return Benchmark(name, train, test, info)


def make_fmnist_ovr(normal_class: int, train_per_class: int, test_per_class: int,
                    image_size: int, seed: int, root: Path | None = None) -> Benchmark:
    """One-vs-rest: one normal class, the nine others are anomalies."""
    others = [c for c in range(10) if c != normal_class]
    return make_fmnist([normal_class], others, train_per_class, test_per_class, image_size, seed,
                       root, name=f"fmnist_ovr_{normal_class}")
