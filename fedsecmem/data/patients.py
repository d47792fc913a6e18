"""Which training images belong to one patient (``privacy.unit: patient``).

In medicine a patient often has several images; a guarantee per image is then weaker per patient
(group privacy). With ``privacy.unit: patient`` every image carries its patient, from either:

* ``data.patients``: a CSV file with columns ``image,patient``; ``image`` names a training image as
  ``<product>/<n>``, the n-th (from 0) training image of that product as the benchmark loads it
  (``fedsecmem run`` with the same data settings loads the same images in the same order);
* the folder layout of ``benchmark: mvtec``: ``<category>/train/good/<patient>/<image>.png``, a
  folder name being one person in every category (an image directly in ``train/good`` is a patient
  of its own).

Every training image must have a patient; a patient belongs to one client (the split deals
patients, not images).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedsecmem.data.types import Benchmark
from fedsecmem.errors import UserError

__all__ = ["attach_patients", "group_codes", "image_keys", "read_patients"]


def image_keys(products: np.ndarray, product_names: list[str]) -> list[str]:
    """``<product>/<n>`` of every image: its product and its position among that product's images."""
    seen: dict[int, int] = {}
    keys = []
    for p in products:
        n = seen.get(int(p), 0)
        seen[int(p)] = n + 1
        keys.append(f"{product_names[int(p)]}/{n}")
    return keys


def group_codes(labels: list[str]) -> np.ndarray:
    """Integer codes of patient labels (first appearance first)."""
    codes: dict[str, int] = {}
    return np.array([codes.setdefault(x, len(codes)) for x in labels], np.int64)


def read_patients(path: Path) -> dict[str, str]:
    """``data.patients``: image key -> patient label."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.patients: no file {path}")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "patient"} <= set(rows[0]):
        raise UserError(f"data.patients: {path} needs the columns image,patient")
    out: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        key, patient = (row.get("image") or "").strip(), (row.get("patient") or "").strip()
        if not key or not patient:
            raise UserError(f"data.patients: {path} line {i}: empty image or patient")
        if out.setdefault(key, patient) != patient:
            raise UserError(f"data.patients: {path} line {i}: image {key} given two patients")
    return out


def attach_patients(bench: Benchmark, path: Path) -> None:
    """Set ``bench.train.groups`` from the CSV at ``path`` (every training image must be listed)."""
    mapping = read_patients(path)
    keys = image_keys(bench.train.products, bench.train.product_names)
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise UserError(f"data.patients: {len(missing)} training images have no patient (first: {missing[0]}; "
                        "keys are <product>/<n>, the n-th training image of the product)")
    bench.train.groups = group_codes([mapping[k] for k in keys])
