"""Build the benchmark a ``DataConfig`` names."""

from __future__ import annotations

from fedsecmem.data.elpv import make_elpv
from fedsecmem.data.fmnist import make_fmnist, make_fmnist_ovr
from fedsecmem.data.mvtec import make_mvtec
from fedsecmem.data.textures import make_textures
from fedsecmem.data.patients import attach_patients
from fedsecmem.data.types import Benchmark
from fedsecmem.errors import UserError

__all__ = ["CALIBRATION_CAVEATS", "load_benchmark"]

# Where a benchmark's training images are not independent of each other, a site's calibration images
# (taken from its training normals) resemble its bank more than new images do, and its threshold is
# set too low: said beside the decisions (results.json ``decisions.caveat``, docs/predict.md).
CALIBRATION_CAVEATS = {
    "textures": "training crops are cut from the top of one photograph per product and overlap one another, "
                "while test crops come from its held-out bottom: calibration crops overlap the bank's crops, "
                "so the threshold sits below new crops' scores and the false-positive rate exceeds the target",
}


def load_benchmark(cfg, seed: int, patients: bool = False) -> Benchmark:
    """``cfg``: a ``DataConfig``. Fashion-MNIST reuses ``train_per_product`` per normal class;
    ELPV counts ``*_per_product`` per wafer type (``root``: a copy of its files, else the package).
    ``patients``: every training image must carry its patient (``privacy.unit: patient``)."""
    bench = _load(cfg, seed)
    if cfg.patients is not None:
        attach_patients(bench, cfg.patients)
    if patients and bench.train.groups is None:
        raise UserError("privacy.unit: patient needs each training image's patient: data.patients (a CSV of "
                        "image,patient) or, for mvtec, train/good/<patient>/ folders")
    return bench


def _load(cfg, seed: int) -> Benchmark:
    if cfg.benchmark == "textures":
        return make_textures(cfg.products, cfg.train_per_product, cfg.test_normal_per_product,
                             cfg.test_defect_per_product, cfg.defects, cfg.crop_size,
                             cfg.image_size, seed)
    if cfg.benchmark == "fmnist":
        return make_fmnist(cfg.normal_classes, cfg.anomaly_classes, cfg.train_per_product,
                           cfg.test_per_class, cfg.image_size, seed, cfg.root)
    if cfg.benchmark == "fmnist_ovr":
        return make_fmnist_ovr(cfg.normal_class, cfg.train_per_product, cfg.test_per_class,
                               cfg.image_size, seed, cfg.root)
    if cfg.benchmark == "mvtec":
        return make_mvtec(cfg.root, cfg.image_size, cfg.categories, cfg.train_per_product, window=cfg.window,
                          axis=cfg.slice_axis)
    if cfg.benchmark == "elpv":
        return make_elpv(cfg.image_size, cfg.train_per_product, cfg.test_normal_per_product,
                         cfg.test_defect_per_product, cfg.uncertain_per_product, seed, cfg.root)
    raise ValueError(f"unknown benchmark {cfg.benchmark!r}")
