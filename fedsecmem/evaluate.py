"""Per-client evaluation: image AUROC (patch-max and image-kNN scores), pixel AUROC, PRO."""

from __future__ import annotations

import numpy as np

from fedsecmem.data.types import ImageSet
from fedsecmem.metrics import auroc, pixel_auroc, pro_score
from fedsecmem.scoring import Scores, anomaly_maps


def evaluate_client(test: ImageSet, scores: Scores, primary: str, sigma: float,
                    with_pro: bool) -> dict:
    """Metrics of one client's test set; a metric is None where it is undefined."""
    out: dict = {
        "n_test": int(len(test)),
        "n_test_anomalous": int(test.labels.sum()),
        "auroc_patch": auroc(test.labels, scores.image_patch),
        "auroc_knn": auroc(test.labels, scores.image_knn) if scores.image_knn is not None else None,
        "auroc_pixel": None,
        "pro": None,
    }
    out["auroc_image"] = out["auroc_knn"] if primary == "image" else out["auroc_patch"]
    if test.masks is not None and test.masks.any():
        maps = anomaly_maps(scores.patch, test.images.shape[1], sigma)
        out["auroc_pixel"] = pixel_auroc(test.masks, maps)
        if with_pro:
            out["pro"] = pro_score(test.masks, maps)
    return out


def mean_defined(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None
