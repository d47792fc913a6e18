"""A site's last steps of a run, the same in process, under ``join`` and on Ray: calibrate its
threshold on its own calibration images and keep its model folder."""

from __future__ import annotations

from pathlib import Path

from fedsecmem.detector.backbone import BackboneInfo, Embeddings
from fedsecmem.detector.site import SiteDetector
from fedsecmem.detector.threshold import Threshold, calibrate
from fedsecmem.model.store import save_model
from fedsecmem.progress import console

__all__ = ["keep_model", "site_threshold"]


def site_threshold(cfg, detector: SiteDetector | None, calibration: Embeddings | None) -> Threshold | None:
    """The threshold of ``detector`` at ``predict.target_fpr`` from the scores of the site's
    calibration images (None without them)."""
    if detector is None or calibration is None or len(calibration.patches) == 0:
        return None
    scores = detector.score(calibration).image(cfg.scoring.primary)
    try:
        return calibrate(scores, cfg.predict.target_fpr, cfg.predict.calibration)
    except ValueError as exc:  # e.g. a non-finite score: the site keeps its model, without a threshold
        console.print(f"[yellow]no threshold: {exc}", highlight=False)
        return None


def keep_model(cfg, folder: Path, site: int, detector: SiteDetector, threshold: Threshold | None,
               backbone: BackboneInfo, run_id: str, n_train: int, memory=None) -> str:
    """Write site ``site``'s model folder; returns the manifest's SHA-256 (signed in its ledger)."""
    pv = cfg.privacy
    about = {"site": site, "run_id": run_id, "run_name": cfg.name, "method": cfg.method,
             "protocol": cfg.protocol if cfg.method not in ("local", "central") else "none",
             "dp": bool(pv.dp), "privacy_unit": pv.unit, "data": cfg.data.benchmark,
             "n_train": int(n_train), "n_calibration": threshold.n_calibration if threshold else 0,
             "calibration_fraction": cfg.predict.calibration_fraction,
             # how files became images in training: predict converts alike unless told otherwise
             "conversion": {"window": list(cfg.data.window) if cfg.data.window else None,
                            "slice_axis": cfg.data.slice_axis}}
    scoring = {"primary": cfg.scoring.primary, "smoothing_sigma": cfg.scoring.smoothing_sigma,
               "banks": list(detector.patch_banks)}
    return save_model(folder, detector, backbone, scoring, threshold, about, memory)
