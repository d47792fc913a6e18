"""Evaluation: image AUROC (patch-max and image-kNN scores), pixel AUROC and PRO, per client,
per category (product) and per anomaly kind.

A client's test set mixes products whose score scales differ, which depresses a per-client
AUROC; the per-category figure (MVTec AD's protocol: each category scored on its own) is the one
comparable with the literature. Images scored apart (``ImageSet.apart``: ELPV's uncertain cells)
never enter the headline figures; each of their kinds is scored against the same normals in
``per_kind``.
"""

from __future__ import annotations

import numpy as np

from fedsecmem.data.types import ImageSet
from fedsecmem.detector.metrics import auroc, pixel_auroc, pro_score
from fedsecmem.detector.scoring import Scores, anomaly_maps
from fedsecmem.detector.threshold import Threshold, decision_metrics

__all__ = ["DECISION_KEYS", "across_clients", "category_summary", "decisions", "evaluate_client", "headline_auroc",
           "mean_defined"]

DECISION_KEYS = ("fpr", "tpr", "f1")  # per category, at the site's threshold

def headline_auroc(test: ImageSet, image_scores: np.ndarray | None) -> float | None:
    """Image AUROC over the images the headline counts (uncertain kinds left out)."""
    if image_scores is None:
        return None
    keep = test.headline
    return auroc(test.labels[keep], np.asarray(image_scores)[keep])


def _per_category(test: ImageSet, image: np.ndarray, maps: np.ndarray | None,
                  threshold: Threshold | None = None) -> dict:
    out = {}
    keep = test.headline
    for p in np.unique(test.products[keep]):
        if p < 0:  # images of no product (Fashion-MNIST anomaly classes) belong to no category
            continue
        sel = keep & (test.products == p)
        row = {"n_test": int(sel.sum()), "auroc_image": auroc(test.labels[sel], image[sel]), "auroc_pixel": None}
        if maps is not None and test.masks[sel].any():
            row["auroc_pixel"] = pixel_auroc(test.masks[sel], maps[sel])
        if threshold is not None:
            found = decision_metrics(test.labels[sel], image[sel], threshold.value)
            row.update({k: found[k] for k in DECISION_KEYS})
        out[test.product_names[p]] = row
    return out


def _per_kind(test: ImageSet, image: np.ndarray) -> dict:
    """Each anomalous kind against all of the client's normal images (``apart``: a kind scored apart
    from the headline)."""
    normal = test.labels == 0
    apart = ~test.headline
    out = {}
    for kind in sorted({k for k, lab in zip(test.kinds, test.labels) if lab}):
        mine = np.array([k == kind for k in test.kinds])
        sel = normal | mine
        out[kind] = {"n_test": int(mine.sum()), "auroc_image": auroc(test.labels[sel], image[sel]),
                     "apart": bool(apart[mine].any())}
    return out


def decisions(test: ImageSet, image: np.ndarray | None, threshold: Threshold | None) -> dict:
    """The site's threshold and the decisions it gives on the headline test images: FPR, TPR,
    precision and F1 (``score > threshold`` is anomalous); all None without a threshold."""
    out = {"threshold": None, "threshold_method": None, "n_calibration": 0, "fpr": None, "tpr": None,
           "precision": None, "f1": None}
    if threshold is None or image is None:
        return out
    keep = test.headline
    found = decision_metrics(test.labels[keep], np.asarray(image)[keep], threshold.value)
    out.update(threshold=threshold.value, threshold_method=threshold.method, n_calibration=threshold.n_calibration,
               **{k: found[k] for k in ("fpr", "tpr", "precision", "f1")})
    return out


def evaluate_client(test: ImageSet, scores: Scores, primary: str, sigma: float,
                    with_pro: bool, threshold: Threshold | None = None) -> dict:
    """Metrics of one client's test set; a metric is None where it is undefined. ``threshold``: the
    site's calibrated threshold on its primary image score (decision metrics beside the AUROC)."""
    head = test.headline
    out: dict = {
        "n_test": int(head.sum()),
        "n_test_anomalous": int(test.labels[head].sum()),
        "n_test_apart": int((~head).sum()),  # scored, reported per kind only
        "auroc_patch": headline_auroc(test, scores.image_patch),
        "auroc_knn": headline_auroc(test, scores.image_knn),
        "auroc_pixel": None,
        "pro": None,
    }
    out["auroc_image"] = out["auroc_knn"] if primary == "image" else out["auroc_patch"]
    maps = None
    if test.masks is not None and test.masks[head].any():
        maps = anomaly_maps(scores.patch, test.images.shape[1], sigma)
        out["auroc_pixel"] = pixel_auroc(test.masks[head], maps[head])
        if with_pro:
            out["pro"] = pro_score(test.masks[head], maps[head])
    image = scores.image(primary) if primary == "patch" or scores.image_knn is not None else None
    out["per_category"] = _per_category(test, image, maps, threshold) if image is not None else {}
    out["per_kind"] = _per_kind(test, image) if image is not None else {}
    out.update(decisions(test, image, threshold))
    return out


def mean_defined(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _weighted(rows: list[dict], key: str) -> float | None:
    pairs = [(r[key], r["n_test"]) for r in rows if r.get(key) is not None]
    if not pairs:
        return None
    vals, w = np.array(pairs, float).T
    return float((vals * w).sum() / w.sum())


def across_clients(per_client: list[dict], field: str) -> dict:
    """``field`` (per_category / per_kind) of every client merged: per name, each metric averaged
    over the clients where it is defined, weighted by their test images of that name."""
    names = sorted({n for r in per_client for n in r.get(field, {})})
    out = {}
    for name in names:
        rows = [r[field][name] for r in per_client if name in r.get(field, {})]
        merged = {"n_test": int(sum(x["n_test"] for x in rows))}
        for key in sorted({k for x in rows for k in x if k != "n_test"}):
            merged[key] = _weighted(rows, key)
        merged["clients"] = sum(x.get("auroc_image") is not None for x in rows)
        if any("apart" in x for x in rows):
            merged["apart"] = any(x.get("apart") for x in rows)
        out[name] = merged
    return out


def category_summary(per_client: list[dict]) -> dict:
    """results.json's per-category block: each category, and the mean over categories."""
    cats = across_clients(per_client, "per_category")
    return {"per_category": cats,
            "category_mean_image": mean_defined(list(cats.values()), "auroc_image"),
            "category_mean_pixel": mean_defined(list(cats.values()), "auroc_pixel"),
            "per_kind": across_clients(per_client, "per_kind")}
