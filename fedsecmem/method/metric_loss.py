"""Metric loss of the memory generator: pull towards the nearest memory item, without collapse.

``pull``: mean squared distance of each normal patch embedding to its
nearest memory item (consistency of normal features across clients).
A pull alone collapses (everything moves onto a few memory items, or the
generator shrinks the space); the ``spread`` term (VICReg-style hinge on the
per-dimension standard deviation) keeps every dimension's spread at least at
its value in the backbone space, so the loss cannot win by collapsing.
Both terms are scale-free: pull is divided by the target variance. Shrinking
any dimension d by a factor s saves var_d (1 - s^2) / V in pull and costs
var_d (1 - s) / V in the hinge (V = total target variance), so with ``var_weight`` >= 2 no shrinking pays (the default); the
generator can only reshape the space towards the memory items.
"""

from __future__ import annotations

import torch

__all__ = ["EPS", "anti_collapse_target", "metric_loss", "per_image_metric_loss", "spread"]

EPS = 1e-4


def anti_collapse_target(features: torch.Tensor) -> torch.Tensor:
    """Per-dimension standard deviation of the features the generator starts from."""
    return features.float().std(0).clamp(min=EPS)


def spread(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension standard deviation (the collapse diagnostic)."""
    return z.std(0).mean()


def metric_loss(z: torch.Tensor, memory: torch.Tensor, target_std: torch.Tensor,
                var_weight: float) -> torch.Tensor:
    """pull / total target variance + var_weight * variance-weighted hinge(target_std - std(z))."""
    d2 = torch.cdist(z, memory).pow(2).min(1).values
    pull = d2.mean() / (target_std.pow(2).sum())
    std = torch.sqrt(z.var(0) + EPS)
    # relative deficit per dimension, weighted by the dimension's share of the variance (as the pull is)
    hinge = (target_std * torch.relu(target_std - std)).sum() / target_std.pow(2).sum()
    return pull + var_weight * hinge


def per_image_metric_loss(z: torch.Tensor, x: torch.Tensor, memory: torch.Tensor, var_weight: float) -> torch.Tensor:
    """The metric loss of each image on its own (B,), for DP-SGD, whose per-sample gradients need
    a loss that is a sum of per-image terms: no statistic across the batch, no target measured on
    other images. ``z``: the generator's output for the image's patches (B, P, M); ``x``: its input
    (B, P, D) with M = D, whose per-image spread is the target (the generator starts as the
    identity, so this is the spread it starts from)."""
    b, p, m = z.shape
    target = x.std(1).clamp(min=EPS)  # (B, M)
    total_var = target.pow(2).sum(1)  # (B,)
    d2 = torch.cdist(z.reshape(b * p, m), memory).pow(2).min(1).values.reshape(b, p)
    pull = d2.mean(1) / total_var
    std = torch.sqrt(z.var(1) + EPS)
    hinge = (target * torch.relu(target - std)).sum(1) / total_var
    return pull + var_weight * hinge
