"""Membership inference statistics: attack scores to AUC and TPR at a low FPR, with confidence
intervals, and the likelihood-ratio attack (LiRA, Carlini et al. 2022) from shadow releases.

A score is higher for "more likely a member". AUC 0.5 and TPR = FPR are what
an attacker who learns nothing gets; intervals are percentile bootstraps that
resample members and non-members separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

VAR_FLOOR = 1e-12  # keeps a Gaussian fitted to identical shadow scores proper


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """True-positive rate at the largest threshold whose false-positive rate is <= ``fpr``."""
    f, t, _ = roc_curve(labels, scores)
    ok = f <= fpr
    return float(t[ok].max()) if ok.any() else 0.0


@dataclass
class AttackResult:
    auc: float
    auc_ci: tuple[float, float]
    tpr: float  # at ``fpr``
    tpr_ci: tuple[float, float]
    fpr: float
    members: int
    nonmembers: int

    def to_dict(self) -> dict:
        return {"auc": self.auc, "auc_ci": list(self.auc_ci), f"tpr_at_{self.fpr:g}_fpr": self.tpr,
                "tpr_ci": list(self.tpr_ci), "fpr": self.fpr, "members": self.members, "nonmembers": self.nonmembers}


def evaluate_attack(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float = 0.01,
                    bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> AttackResult:
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if len(m) == 0 or len(n) == 0:
        raise ValueError(f"membership inference needs members and non-members, got {len(m)} and {len(n)}")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("membership inference: scores must be finite")
    labels = np.r_[np.ones(len(m)), np.zeros(len(n))]
    scores = np.r_[m, n]
    auc = float(roc_auc_score(labels, scores))
    tpr = tpr_at_fpr(labels, scores, fpr)
    rng = np.random.default_rng(seed)  # resampling for the intervals only: no secret involved
    aucs, tprs = np.empty(bootstrap), np.empty(bootstrap)
    for b in range(bootstrap):
        bm, bn = m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))]
        s = np.r_[bm, bn]
        aucs[b] = roc_auc_score(labels, s)
        tprs[b] = tpr_at_fpr(labels, s, fpr)
    lo, hi = (1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100
    return AttackResult(auc, (float(np.percentile(aucs, lo)), float(np.percentile(aucs, hi))), tpr,
                        (float(np.percentile(tprs, lo)), float(np.percentile(tprs, hi))), fpr, len(m), len(n))


def shadow_splits(n: int, shadows: int, seed: int) -> np.ndarray:
    """(shadows, n) booleans: which candidates each shadow release includes. Every candidate is in
    exactly half of the shadows (paired complementary halves), as LiRA's online variant asks."""
    if shadows < 2 or shadows % 2:
        raise ValueError(f"shadows must be an even number >= 2, got {shadows}")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(shadows // 2):
        half = np.zeros(n, bool)
        half[rng.permutation(n)[: n // 2]] = True
        rows += [half, ~half]
    return np.stack(rows)


def lira_scores(observed: np.ndarray, shadow_stats: np.ndarray, inclusion: np.ndarray) -> np.ndarray:
    """Online LiRA: per candidate, Gaussians fitted to its statistic over the shadows that included
    it (IN) and those that did not (OUT); the score is log N(obs; IN) - log N(obs; OUT).

    ``observed``: (n,) the statistic on the target release; ``shadow_stats``: (shadows, n);
    ``inclusion``: (shadows, n) booleans. The statistic must be larger for members (e.g. minus a
    distance)."""
    obs = np.asarray(observed, float)
    s = np.asarray(shadow_stats, float)
    inc = np.asarray(inclusion, bool)
    if s.shape != inc.shape or s.shape[1] != len(obs):
        raise ValueError(f"LiRA: shapes differ: observed {obs.shape}, shadows {s.shape}, inclusion {inc.shape}")
    if (inc.sum(0) < 2).any() or ((~inc).sum(0) < 2).any():
        raise ValueError("LiRA: every candidate needs at least 2 shadows with it and 2 without")

    def fit(mask):
        k = mask.sum(0)
        mu = np.where(mask, s, 0).sum(0) / k
        var = np.where(mask, (s - mu) ** 2, 0).sum(0) / (k - 1)
        return mu, var

    mu_in, var_in = fit(inc)
    mu_out, var_out = fit(~inc)
    # one pooled variance per candidate (the paper's fixed-variance variant: stabler with few shadows)
    var = np.maximum((var_in + var_out) / 2, VAR_FLOOR)
    return ((obs - mu_out) ** 2 - (obs - mu_in) ** 2) / (2 * var)


def dp_tpr_bound(epsilon: float, delta: float, fpr: float) -> float:
    """The most any attack can reach at false-positive rate ``fpr`` against an (epsilon, delta)-DP
    mechanism (the hypothesis-testing view of DP, Kairouz et al. 2015):
    TPR <= min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))."""
    e = np.exp(epsilon)
    return float(np.clip(np.minimum(e * fpr + delta, 1 - (1 - delta - fpr) / e), 0.0, 1.0))


def dp_auc_bound(epsilon: float, delta: float, grid: int = 100_001) -> float:
    """The largest AUC any attack can have against an (epsilon, delta)-DP mechanism: the area under
    ``dp_tpr_bound`` (e^eps / (1 + e^eps) when delta = 0)."""
    x = np.linspace(0.0, 1.0, grid)
    e = np.exp(epsilon)
    y = np.clip(np.minimum(e * x + delta, 1 - (1 - delta - x) / e), 0.0, 1.0)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))
