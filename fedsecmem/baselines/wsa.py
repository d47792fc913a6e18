"""Weight Scope Alignment (WSA; Xu et al., "Weight Scope Alignment: A Frustratingly Easy Method
for Model Merging"): each layer's weights, seen as a Gaussian (mean, standard deviation), are
pulled towards a target scope during local training, so that models trained apart stay mergeable
by averaging.

Here the target is the **fused scope** of the clients' models, per weight matrix (biases are left
alone): each client sends its layers' (mean, std) with its model through the same secure sum, and
the target of round r + 1 is their size-weighted average, ``mean* = sum_k n_k mean_k / n`` and
``std* = sum_k n_k std_k / n``, over the models the clients trained in round r (round 1 has no
target: every client starts from the same model). The fused scope is not the scope of the averaged
model: averaging shrinks the spread (and a zero-initialised layer has none at the start). The
penalty added to the local loss is ``wsa_weight * sum_l ((mean_l - mean*_l)^2 + (std_l - std*_l)^2)``.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsecmem.method.client import LossTerm

__all__ = ["SCOPE_KEY", "STD_EPS", "ScopeTerm", "scope_of", "scope_penalty", "split_scope", "with_scope"]

STD_EPS = 1e-12  # keeps the standard deviation differentiable at a constant (e.g. zero-initialised) layer

Scope = dict[str, tuple[float, float]]


def _scoped(name: str) -> bool:
    return name.endswith("weight")


def _mean_std(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t.mean(), torch.sqrt(t.var(unbiased=False) + STD_EPS)


def scope_of(state: dict[str, torch.Tensor]) -> Scope:
    """(mean, std) of every weight tensor of a state dict."""
    return {n: tuple(float(v) for v in _mean_std(t.detach().double())) for n, t in state.items() if _scoped(n)}


SCOPE_KEY = "wsa-scope:"  # prefix of the (mean, std) entries that travel with a model's state


def with_scope(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus, per weight tensor, its (mean, std) under ``SCOPE_KEY + name``: one secure
    average then gives the averaged model and the fused scope together."""
    return {**state, **{SCOPE_KEY + n: torch.tensor(ms, dtype=torch.float64) for n, ms in scope_of(state).items()}}


def split_scope(averaged: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Scope]:
    """Undo ``with_scope`` after averaging: the model's state and the fused scope."""
    state = {n: t for n, t in averaged.items() if not n.startswith(SCOPE_KEY)}
    scope = {n[len(SCOPE_KEY):]: (float(t[0]), float(t[1])) for n, t in averaged.items() if n.startswith(SCOPE_KEY)}
    return state, scope


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


class ScopeTerm(LossTerm):
    """``weight * scope_penalty`` in the local loss: the pull towards the fused scope ``target``."""

    def __init__(self, weight: float, target: Scope):
        self.weight, self.target = weight, target

    def penalty(self, generator: nn.Module) -> torch.Tensor:
        return self.weight * scope_penalty(generator, self.target)
