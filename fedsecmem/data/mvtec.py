"""Loader for the MVTec AD folder layout (shared by BTAD and MPDD); masks optional.

``root/<category>/train/good/*.png``, ``root/<category>/test/<type>/*.png``,
``root/<category>/ground_truth/<type>/<stem>_mask.png``. Each category is one
product. A missing mask for a defective image means "no pixel labels" for
the whole set (pixel AUROC is then not reported).

Images may be any format of :mod:`fedsecmem.data.imageio` (8-bit raster, 16-bit
PNG/TIFF, DICOM, NIfTI); a multi-frame file gives one image per frame or slice.
Such a file is one unit (one scan, one person) in training, and as a defective
test image it has no mask (one 2-D mask cannot label several frames).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fedsecmem.data.imageio import (SUPPORTED_SUFFIXES, UnreadableImage, image_stem, read_frames,
                                    supported_suffix, to_model_input)
from fedsecmem.data.patients import group_codes
from fedsecmem.data.types import Benchmark, ImageSet
from fedsecmem.errors import UserError

__all__ = ["IMAGE_SUFFIXES", "find_categories", "make_mvtec"]

IMAGE_SUFFIXES = SUPPORTED_SUFFIXES  # kept for importers of the old name


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; hidden files (e.g. macOS ``._x.png``) skipped."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and supported_suffix(p))


def _load_frames(path: Path, size: int, window: tuple[float, float] | None, axis: int) -> list[np.ndarray]:
    """Every frame of ``path`` resized to ``size``; an unreadable file is a one-line ``UserError``."""
    try:
        frames = read_frames(path, window=window, axis=axis)
    except UnreadableImage as exc:
        raise UserError(f"data.root: cannot read image {exc.path}: {exc.reason}") from None
    return [to_model_input(f.image, size) for f in frames]


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
               train_limit: int | None = None, *, window: tuple[float, float] | None = None,
               axis: int = 2) -> Benchmark:
    """Load categories from an MVTec-layout folder; images resized to ``image_size``.

    ``train_limit`` caps the training images (frames) per category; ``window`` and ``axis`` are passed
    to :func:`~fedsecmem.data.imageio.read_frames` (intensity window, NIfTI slicing axis).
    """
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
        # person; a file directly in good/ stands alone (all frames of a multi-frame file: one unit)
        train_files = [*_images_in(good), *(p for d in sorted(x for x in good.iterdir() if x.is_dir())
                                             for p in _images_in(d))] if good.is_dir() else []
        imgs: list[np.ndarray] = []
        for p in train_files:
            room = None if train_limit is None else train_limit - len(imgs)
            if room is not None and room <= 0:
                break
            frames = _load_frames(p, image_size, window, axis)[:room]
            imgs += frames
            tr_patient += [f"{p.parent.name}/" if p.parent != good else f"{cat}/{p.name}"] * len(frames)
        if not imgs:
            raise UserError(f"data.root: no training images in {good}")
        tr_imgs += imgs
        tr_prod += [pi] * len(imgs)
        test_dir = root / cat / "test"
        if not test_dir.is_dir():
            raise UserError(f"data.root: missing test folder {test_dir}")
        for kind_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
            kind = kind_dir.name
            for p in _images_in(kind_dir):
                frames = _load_frames(p, image_size, window, axis)
                te_imgs += frames
                te_prod += [pi] * len(frames)
                te_kinds += [kind] * len(frames)
                mp = root / cat / "ground_truth" / kind / f"{image_stem(p)}_mask.png"
                if kind != "good" and len(frames) == 1 and mp.exists():
                    te_masks.append(_load_mask(mp, image_size))
                else:  # a defect without a mask, or with frames one 2-D mask cannot label: no pixel labels
                    have_masks = have_masks and kind == "good"
                    te_masks += [np.zeros((image_size, image_size), bool)] * len(frames)
    if not te_imgs:
        raise UserError(f"data.root: no test images under {root}")
    folders = len(tr_patient) > len(set(tr_patient))  # some unit has several images: patient folders or scans
    train = ImageSet(np.stack(tr_imgs), np.zeros(len(tr_imgs), np.int64), np.array(tr_prod),
                     ["good"] * len(tr_imgs), list(cats), groups=group_codes(tr_patient) if folders else None)
    labels = np.array([0 if k == "good" else 1 for k in te_kinds])
    test = ImageSet(np.stack(te_imgs), labels, np.array(te_prod), te_kinds, list(cats),
                    masks=np.stack(te_masks) if have_masks else None)
    return Benchmark("mvtec", train, test, {"root": str(root), "categories": list(cats)})
