"""Loader for the MVTec AD folder layout (shared by BTAD and MPDD); masks optional.

``root/<category>/train/good/*.png``, ``root/<category>/test/<type>/*.png``,
``root/<category>/ground_truth/<type>/<stem>_mask.png``. Each category is one
product. A missing mask for a defective image means "no pixel labels" for
the whole set (pixel AUROC is then not reported).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fedsecmem.data.patients import group_codes
from fedsecmem.data.types import Benchmark, ImageSet
from fedsecmem.errors import UserError

__all__ = ["IMAGE_SUFFIXES", "find_categories", "make_mvtec"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _load_rgb(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    except OSError as exc:
        raise UserError(f"data.root: cannot read image {path}: {exc}") from None


def _load_mask(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L").resize((size, size), Image.NEAREST)) > 127
    except OSError as exc:
        raise UserError(f"data.root: cannot read mask {path}: {exc}") from None


def find_categories(root: Path) -> list[str]:
    if not root.is_dir():
        raise UserError(f"data.root: folder not found: {root}")
    cats = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not cats:
        raise UserError(f"data.root: no category with train/good/ under {root} (MVTec AD layout)")
    return cats


def make_mvtec(root: Path, image_size: int, categories: list[str] | None = None,
               train_limit: int | None = None) -> Benchmark:
    """Load categories from an MVTec-layout folder; images resized to ``image_size``."""
    root = Path(root)
    available = find_categories(root)
    cats = categories or available
    unknown = [c for c in cats if c not in available]
    if unknown:
        raise UserError(f"data.categories: {unknown} not under {root} (found {available})")
    tr_imgs, tr_prod, tr_patient = [], [], []
    te_imgs, te_masks, te_prod, te_kinds = [], [], [], []
    have_masks = True
    for pi, cat in enumerate(cats):
        good = root / cat / "train" / "good"
        # train/good/<patient>/*.png: one folder per patient, the same name in every category the same
        # person (an image directly in good/ stands alone)
        train_files = [*_images_in(good), *(p for d in sorted(x for x in good.iterdir() if x.is_dir())
                                             for p in _images_in(d))][:train_limit] if good.is_dir() else []
        if not train_files:
            raise UserError(f"data.root: no training images in {good}")
        tr_imgs += [_load_rgb(p, image_size) for p in train_files]
        tr_prod += [pi] * len(train_files)
        tr_patient += [f"{p.parent.name}/" if p.parent != good else f"{cat}/{p.name}" for p in train_files]
        test_dir = root / cat / "test"
        if not test_dir.is_dir():
            raise UserError(f"data.root: missing test folder {test_dir}")
        for kind_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
            kind = kind_dir.name
            for p in _images_in(kind_dir):
                te_imgs.append(_load_rgb(p, image_size))
                te_prod.append(pi)
                te_kinds.append(kind)
                if kind == "good":
                    te_masks.append(np.zeros((image_size, image_size), bool))
                    continue
                mp = root / cat / "ground_truth" / kind / f"{p.stem}_mask.png"
                if mp.exists():
                    te_masks.append(_load_mask(mp, image_size))
                else:
                    have_masks = False
                    te_masks.append(np.zeros((image_size, image_size), bool))
    if not te_imgs:
        raise UserError(f"data.root: no test images under {root}")
    folders = len(tr_patient) > len(set(tr_patient))  # some patient has several images: folders were used
    train = ImageSet(np.stack(tr_imgs), np.zeros(len(tr_imgs), np.int64), np.array(tr_prod),
                     ["good"] * len(tr_imgs), list(cats), groups=group_codes(tr_patient) if folders else None)
    labels = np.array([0 if k == "good" else 1 for k in te_kinds])
    test = ImageSet(np.stack(te_imgs), labels, np.array(te_prod), te_kinds, list(cats),
                    masks=np.stack(te_masks) if have_masks else None)
    return Benchmark("mvtec", train, test, {"root": str(root), "categories": list(cats)})
