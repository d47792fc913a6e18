"""ELPV: real electroluminescence (EL) images of solar cells, the real-defect benchmark.

The ELPV data set (PyPI package ``elpv-dataset``) holds 2,624 grey 300x300
images of monocrystalline and polycrystalline solar cells cut from 44 modules,
each annotated by experts with a defect probability of 0, 1/3, 2/3 or 1
(``labels.csv``: ``images/cellNNNN.png  <probability>  <mono|poly>``).

Licence: the images and labels are CC BY-NC-SA 4.0 (attribution,
non-commercial, share-alike; the package's code is Apache-2.0). Anything
derived from them (anomaly maps, memories, trained generators) inherits those
terms. Cite Buerhop-Lutz et al., EU PVSEC 2018 (doi:10.4229/35thEUPVSEC20182018-5CV.3.15)
and Deitsch et al., Solar Energy 185, 2019 (doi:10.1016/j.solener.2019.02.067).

Protocol: the two wafer types are the products (0 mono, 1 poly). Normal =
probability 0, anomalous = probability 1 (kind ``defective``). For each wafer
type a seeded permutation of its normal cells gives the training cells (its
head) and the normal test cells (its tail), disjoint; a second one picks the
defective test cells; the cells of probability 1/3 and 2/3 (kinds
``uncertain_p33`` / ``uncertain_p67``, label 1) are tested but scored apart:
they are marked ``apart`` (``ImageSet.apart``) so the headline AUROC skips them. Each
draw has its own generator ``default_rng([seed, 0xE1F7, product, group])``, so
changing one count never reshuffles the other groups, and taking head / tail
keeps the test normals fixed when only ``train_per_product`` changes.
Counts above what the data holds are refused (``UserError`` naming the field).
There are no pixel masks (``masks=None``). Only the chosen files are read:
grey PNGs resized with PIL bilinear, replicated to three channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fedsecmem.data.types import UNCERTAIN, Benchmark, ImageSet
from fedsecmem.errors import UserError

__all__ = [
    "Cell", "KIND_DEFECTIVE", "KIND_P33", "KIND_P67", "LICENCE", "PRODUCTS", "SOURCE", "make_elpv",
    "package_dir", "read_labels",
]

PRODUCTS = ("mono", "poly")
LICENCE = "CC BY-NC-SA 4.0"
SOURCE = ("ELPV data set, PyPI elpv-dataset (https://github.com/zae-bayern/elpv-dataset); "
          "Buerhop-Lutz et al. 2018, Deitsch et al. 2019")
KIND_DEFECTIVE = "defective"
KIND_P33 = f"{UNCERTAIN}_p33"
KIND_P67 = f"{UNCERTAIN}_p67"
_LEVEL_NAMES = {0: "0", 1: "1/3", 2: "2/3", 3: "1"}
_SEED_TAG = 0xE1F7  # separates ELPV's draws from other uses of the run seed
_GROUPS = {"normal": 0, "defective": 1, "p33": 2, "p67": 3}


@dataclass(frozen=True)
class Cell:
    path: str      # as written in labels.csv, relative to its folder
    level: int     # defect probability * 3: 0, 1, 2, 3
    product: int   # index into PRODUCTS


def package_dir() -> Path:
    """Folder of the installed package's ``labels.csv`` and ``images/``."""
    try:
        from importlib.resources import files

        folder = Path(str(files("elpv_dataset") / "data"))
    except ModuleNotFoundError:
        raise UserError("data.benchmark: elpv needs the package elpv-dataset, which is not installed "
                        "(pip install elpv-dataset, or make setup; or set data.root to a copy of its "
                        "labels.csv and images/)") from None
    if not (folder / "labels.csv").is_file():
        raise UserError(f"data.benchmark: elpv: no labels.csv in {folder} "
                        "(reinstall elpv-dataset: pip install --force-reinstall elpv-dataset)")
    return folder


def read_labels(folder: Path) -> list[Cell]:
    """Parse ``folder/labels.csv`` (whitespace-separated path, probability, wafer type)."""
    path = folder / "labels.csv"
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"data.root: cannot read {path}: {exc}") from None
    cells = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            name, prob, kind = parts
            level = int(round(float(prob) * 3))
            if not (0 <= level <= 3 and abs(float(prob) * 3 - level) < 1e-6):
                raise ValueError
            product = PRODUCTS.index(kind)
        except ValueError:
            raise UserError(f"data.root: {path} line {lineno}: expected '<image path> <probability "
                            f"0, 1/3, 2/3 or 1> <mono|poly>', got {line.strip()!r}") from None
        cells.append(Cell(name, level, product))
    if not cells:
        raise UserError(f"data.root: {path} lists no cells")
    return cells


def _load(folder: Path, cells: list[Cell], size: int) -> np.ndarray:
    out = np.empty((len(cells), size, size, 3), np.uint8)
    for i, cell in enumerate(cells):
        path = folder / cell.path
        try:
            with Image.open(path) as im:
                grey = im.convert("L")
                if grey.size != (size, size):
                    grey = grey.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(grey)[..., None]
        except OSError as exc:
            raise UserError(f"data.root: cannot read ELPV image {path}: {exc}") from None
    return out


def _perm(pool: list[Cell], seed: int, product: int, group: str) -> list[Cell]:
    rng = np.random.default_rng([seed, _SEED_TAG, product, _GROUPS[group]])
    return [pool[i] for i in rng.permutation(len(pool))]


def make_elpv(image_size: int, train_per_product: int, test_normal_per_product: int,
              test_defect_per_product: int, uncertain_per_product: int, seed: int,
              root: Path | str | None = None) -> Benchmark:
    """ELPV cells per wafer type: ``train_per_product`` normal training cells; test:
    ``test_normal_per_product`` other normal cells, ``test_defect_per_product`` defective ones
    and ``uncertain_per_product`` each of probability 1/3 and 2/3 (scored apart)."""
    if root is not None:
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise UserError(f"data.root: ELPV folder not found: {folder} (expected labels.csv and images/)")
        if not (folder / "labels.csv").is_file():
            raise UserError(f"data.root: no labels.csv in {folder} (ELPV layout: labels.csv and images/)")
        where = f"ELPV at {folder} has"
    else:
        folder = package_dir()
        where = "ELPV has"
    cells = read_labels(folder)
    pools = {(p, lv): sorted((c for c in cells if c.product == p and c.level == lv), key=lambda c: c.path)
             for p in range(len(PRODUCTS)) for lv in range(4)}

    train_cells: list[Cell] = []
    test_cells: list[Cell] = []
    test_kinds: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    for p, pname in enumerate(PRODUCTS):
        normal = pools[(p, 0)]
        if test_normal_per_product > len(normal):
            raise UserError(f"data.test_normal_per_product: {test_normal_per_product} normal {pname} "
                            f"test cells asked for, {where} {len(normal)}")
        if train_per_product + test_normal_per_product > len(normal):
            raise UserError(f"data.train_per_product: {train_per_product} train + {test_normal_per_product} "
                            f"test normal {pname} cells asked for, {where} {len(normal)} (at most "
                            f"{len(normal) - test_normal_per_product} train with that many test)")
        order = _perm(normal, seed, p, "normal")
        train_cells += order[:train_per_product]
        picked = {"good": order[len(order) - test_normal_per_product:]}
        wanted = (("defective", 3, test_defect_per_product, KIND_DEFECTIVE, "data.test_defect_per_product"),
                  ("p33", 1, uncertain_per_product, KIND_P33, "data.uncertain_per_product"),
                  ("p67", 2, uncertain_per_product, KIND_P67, "data.uncertain_per_product"))
        for group, level, n, kind, field in wanted:
            pool = pools[(p, level)]
            if n > len(pool):
                raise UserError(f"{field}: {n} {pname} cells of defect probability {_LEVEL_NAMES[level]} "
                                f"asked for, {where} {len(pool)}")
            picked[kind] = _perm(pool, seed, p, group)[:n]
        for kind, chosen in picked.items():
            test_cells += chosen
            test_kinds += [kind] * len(chosen)
        counts[pname] = {"train": train_per_product, **{k: len(v) for k, v in picked.items()}}

    train = ImageSet(_load(folder, train_cells, image_size), np.zeros(len(train_cells), np.int64),
                     np.array([c.product for c in train_cells], np.int64), ["good"] * len(train_cells),
                     list(PRODUCTS))
    labels = np.array([0 if k == "good" else 1 for k in test_kinds], np.int64)
    test = ImageSet(_load(folder, test_cells, image_size), labels,
                    np.array([c.product for c in test_cells], np.int64), test_kinds, list(PRODUCTS),
                    apart=np.array([k.startswith(UNCERTAIN) for k in test_kinds], bool))
    available = {pname: {_LEVEL_NAMES[lv]: len(pools[(p, lv)]) for lv in range(4)}
                 for p, pname in enumerate(PRODUCTS)}
    info = {
        "source": SOURCE,
        "licence": LICENCE,
        "root": str(folder),
        "counts": counts,
        "available": available,
        "train_files": [c.path for c in train_cells],
        "test_files": [c.path for c in test_cells],
    }
    return Benchmark("elpv", train, test, info)
