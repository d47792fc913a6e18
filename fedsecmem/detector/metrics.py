"""Detection metrics: image AUROC, pixel AUROC (scikit-learn) and PRO."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = ["PRO_MAX_FPR", "PRO_THRESHOLDS", "auroc", "pixel_auroc", "pro_score"]

PRO_MAX_FPR = 0.3  # PRO is integrated over FPR in [0, 0.3] (MVTec AD convention)
PRO_THRESHOLDS = 200


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present (undefined)."""
    labels = np.asarray(labels).ravel()
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, np.asarray(scores).ravel()))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    return auroc(masks.astype(np.uint8), maps)


def pro_score(masks: np.ndarray, maps: np.ndarray, max_fpr: float = PRO_MAX_FPR,
              n_thresholds: int = PRO_THRESHOLDS) -> float | None:
    """Area under the per-region-overlap curve up to ``max_fpr``, normalised to [0, 1].

    Each connected defect region counts equally, whatever its size.
    """
    masks = masks.astype(bool)
    if not masks.any() or masks.all():
        return None
    labels = np.zeros(masks.shape, np.int64)
    n_regions = 0
    for i, m in enumerate(masks):
        lab, k = ndimage.label(m)
        labels[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += k
    region_size = np.bincount(labels.ravel(), minlength=n_regions + 1)[1:].astype(float)
    normal = maps[~masks]
    region_scores = maps[masks]
    region_ids = labels[masks] - 1
    thresholds = np.unique(np.quantile(normal, np.linspace(1.0 - max_fpr, 1.0, n_thresholds)))[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        fprs.append(float((normal > t).mean()))
        hit = np.bincount(region_ids[region_scores > t], minlength=n_regions)
        pros.append(float((hit / region_size).mean()))
    fprs.append(1.0)  # threshold below every score: everything flagged
    pros.append(1.0)
    fprs, pros = np.array(fprs), np.array(pros)
    end = float(np.interp(max_fpr, fprs, pros))
    keep = fprs < max_fpr
    curve_x = np.append(fprs[keep], max_fpr)
    curve_y = np.append(pros[keep], end)
    return float(np.trapezoid(curve_y, curve_x) / max_fpr)
