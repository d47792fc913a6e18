"""Weight Scope Alignment (WSA; Xu et al., "Weight Scope Alignment: A Frustratingly Easy Method
for Model Merging"): each layer's weights, seen as a Gaussian (mean, standard deviation), are
pulled towards a target scope during local training, so that models trained apart stay mergeable
by averaging.

Here the target is the scope of the global model a round starts from (the clients' models fused
by the secure average), per weight matrix; biases are left alone. The penalty added to the local
loss is ``wsa_weight * sum_l ((mean_l - mean*_l)^2 + (std_l - std*_l)^2)``.
"""

from __future__ import annotations

import torch
from torch import nn

STD_EPS = 1e-12  # keeps the standard deviation differentiable at a constant (e.g. zero-initialised) layer

Scope = dict[str, tuple[float, float]]


def _scoped(name: str) -> bool:
    return name.endswith("weight")


def _mean_std(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t.mean(), torch.sqrt(t.var(unbiased=False) + STD_EPS)


def scope_of(state: dict[str, torch.Tensor]) -> Scope:
    """(mean, std) of every weight tensor of a state dict."""
    return {n: tuple(float(v) for v in _mean_std(t.detach().double())) for n, t in state.items() if _scoped(n)}


def scope_penalty(module: nn.Module, target: Scope) -> torch.Tensor:
    """Sum over weight tensors of the squared distance of their (mean, std) to ``target``."""
    terms = []
    for n, p in module.named_parameters():
        if n in target:
            mean, std = _mean_std(p)
            tm, ts = target[n]
            terms.append((mean - tm) ** 2 + (std - ts) ** 2)
    if not terms:
        raise ValueError("weight scope alignment: the target names none of the module's weights")
    return torch.stack(terms).sum()
