"""Containers shared by every dataset loader."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Benchmark", "ImageSet", "UNCERTAIN"]

UNCERTAIN = "uncertain"  # name prefix of ELPV's kinds of doubtful label (defect probability 1/3, 2/3)


@dataclass
class ImageSet:
    """Images with labels and optional pixel masks.

    images: (N, H, W, 3) uint8; labels: (N,) 0 normal / 1 anomalous;
    masks: (N, H, W) bool or None when the dataset has none;
    products: (N,) index into ``product_names``; kinds: defect family or 'good';
    apart: (N,) bool or None: images of doubtful label (ELPV's uncertain cells), scored and
    reported apart (per kind), never counted in the headline AUROC; only a loader sets it.
    groups: (N,) int or None: the patient of each image (``privacy.unit: patient``), from
    ``data.patients`` or a folder layout; None when every image stands alone.
    """

    images: np.ndarray
    labels: np.ndarray
    products: np.ndarray
    kinds: list[str]
    product_names: list[str]
    masks: np.ndarray | None = None
    apart: np.ndarray | None = None
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if not (len(self.labels) == len(self.products) == len(self.kinds) == n):
            raise ValueError("ImageSet: images, labels, products and kinds differ in length")
        if self.masks is not None and len(self.masks) != n:
            raise ValueError("ImageSet: masks and images differ in length")
        if self.apart is not None and len(self.apart) != n:
            raise ValueError("ImageSet: apart and images differ in length")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError("ImageSet: groups and images differ in length")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> "ImageSet":
        index = np.asarray(index, dtype=np.int64)
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            products=self.products[index],
            kinds=[self.kinds[i] for i in index],
            product_names=self.product_names,
            masks=None if self.masks is None else self.masks[index],
            apart=None if self.apart is None else self.apart[index],
            groups=None if self.groups is None else self.groups[index],
        )

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)

    @property
    def headline(self) -> np.ndarray:
        """(N,) bool: images the headline AUROC counts (all but those scored apart)."""
        return np.ones(len(self), bool) if self.apart is None else ~np.asarray(self.apart, bool)


@dataclass
class Benchmark:
    """A train split of normal images and a test split of normal and anomalous ones."""

    name: str
    train: ImageSet
    test: ImageSet
    info: dict = field(default_factory=dict)
