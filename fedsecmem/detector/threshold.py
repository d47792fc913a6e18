"""Decisions from scores: a threshold calibrated at a site on normal images that did not build its
bank, at a target false-positive rate, scores normalized to 0..1 with 0.5 at the threshold (as
anomalib's min-max normalization), and the decision metrics measured at the threshold.

Calibration (``calibrate``): with enough calibration images the threshold is the conformal
quantile of their scores, the ``ceil((n + 1)(1 - fpr))``-th smallest, whose false-positive rate on
new normal images is at most the target in expectation. A site rarely holds that many spare normal
images (at a 5% target the quantile needs ``n >= 19`` to exist and is still one order statistic
then), so below ``QUANTILE_MIN_EXPECTED`` expected exceedances it fits a log-normal to the scores
(positive, right-skewed distances) and takes its ``1 - fpr`` quantile instead. Both are recorded
with the threshold (``Threshold.method``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import stats

__all__ = ["CALIBRATION_METHODS", "QUANTILE_MIN_EXPECTED", "SPAN_FLOOR", "Threshold", "calibrate", "decision_metrics",
           "normalize"]

CALIBRATION_METHODS = ("auto", "quantile", "lognormal")
QUANTILE_MIN_EXPECTED = 5.0  # auto: the empirical quantile once (n + 1) * fpr calibration scores lie above it
SPAN_FLOOR = 1e-12  # floor of a log-normal fit's spread and of the normalization span (threshold - lowest score)


@dataclass(frozen=True)
class Threshold:
    """A calibrated decision threshold on one site's image scores."""

    value: float
    target_fpr: float
    method: Literal["quantile", "lognormal", "max"]
    n_calibration: int
    calibration_min: float  # the lowest calibration score: normalized score 0
    calibration_fpr: float  # share of the calibration scores above the threshold

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, rec: dict) -> "Threshold":
        return cls(**{k: rec[k] for k in cls.__dataclass_fields__})


def calibrate(scores: np.ndarray, target_fpr: float, method: str = "auto") -> Threshold:
    """The threshold on ``scores`` (image scores of normal images the site's bank was not built
    from) whose false-positive rate on new normal images is ``target_fpr``."""
    s = np.asarray(scores, np.float64).ravel()
    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if len(s) == 0 or not np.isfinite(s).all():
        raise ValueError("calibration needs at least one finite score")
    n = len(s)
    if method == "auto":
        method = "quantile" if (n + 1) * target_fpr >= QUANTILE_MIN_EXPECTED else "lognormal"
    if method == "lognormal" and (n < 2 or s.min() <= 0):
        method = "quantile"  # a spread needs two positive scores
    if method == "quantile":
        k = math.ceil((n + 1) * (1 - target_fpr))
        if k > n:  # too few scores for this rate: the largest (the rate is then 1 / (n + 1) in expectation)
            value, method = float(s.max()), "max"
        else:
            value = float(np.sort(s)[k - 1])
    else:
        logs = np.log(s)
        spread = max(float(logs.std(ddof=1)), SPAN_FLOOR)
        value = float(np.exp(logs.mean() + stats.norm.isf(target_fpr) * spread))
    return Threshold(value, float(target_fpr), method, n, float(s.min()), float((s > value).mean()))


def normalize(scores: np.ndarray, threshold: Threshold) -> np.ndarray:
    """Scores mapped linearly to 0..1 (clipped): the lowest calibration score to 0, the threshold to
    0.5, as far again above it to 1. A normalized score above 0.5 is a decision 'anomalous'."""
    span = max(threshold.value - threshold.calibration_min, SPAN_FLOOR)
    return np.clip(0.5 + (np.asarray(scores, np.float64) - threshold.value) / (2 * span), 0.0, 1.0)


def decision_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """FPR, TPR, precision and F1 of the decision ``score > threshold`` (None where undefined)."""
    labels = np.asarray(labels).astype(bool).ravel()
    flagged = np.asarray(scores).ravel() > threshold
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    tp = int((flagged & labels).sum())
    fp = int((flagged & ~labels).sum())
    precision = tp / (tp + fp) if tp + fp else None
    tpr = tp / n_pos if n_pos else None
    f1 = (2 * precision * tpr / (precision + tpr) if precision and tpr else 0.0) if n_pos else None
    return {"fpr": fp / n_neg if n_neg else None, "tpr": tpr, "precision": precision, "f1": f1,
            "n_normal": n_neg, "n_anomalous": n_pos}
