"""Every method of the toolkit, declared once with what it supports (as Opacus' registry does for
its accountants): the config validators, the threat model, the deployment check, the sweep and
the runner read this table. Implementations are named as ``module:function`` and resolved when a
run needs them, so this foundation module imports nothing of the pipeline."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

__all__ = ["METHODS", "MethodSpec", "implementation", "spec"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    implementation: str  # "module:function" taking a MethodContext, returning a MethodOutput
    summary: str
    federated: bool = False  # aggregates over the configured protocol (plain / secagg / ckks)
    memory_sharing: bool = False  # shares memory items: a global memory file, the leakage views
    dp: bool = False  # privacy.dp applies (DP-SGD and private k-means)
    deployable: bool = False  # runs as separate processes (fedsecmem serve / join)
    wsa: bool = False  # fl.wsa_weight (Weight Scope Alignment) applies
    unaggregated: str | None = None  # what the server holds when nothing is aggregated (threat model)


METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("local", "fedsecmem.baselines.reference:run_local", "each client alone (PatchCore)",
               unaggregated="nothing leaves a client"),
    MethodSpec("central", "fedsecmem.baselines.reference:run_central", "pooled training images (PatchCore)",
               unaggregated="the server holds every training image"),
    MethodSpec("feddymem", "fedsecmem.method.simulate:run_feddymem", "federated dynamic memory",
               federated=True, memory_sharing=True, dp=True, deployable=True),
    MethodSpec("fedavg", "fedsecmem.baselines.param_sharing:run_fedavg", "FedAvg of the generator",
               federated=True, wsa=True),
    MethodSpec("fedprox", "fedsecmem.baselines.param_sharing:run_fedprox", "FedProx of the generator",
               federated=True, wsa=True),
    MethodSpec("fedsm", "fedsecmem.baselines.param_sharing:run_fedsm",
               "personalized generators (SoftPull) and a federated model selector", federated=True),
)}


def spec(name: str) -> MethodSpec:
    return METHODS[name]


def implementation(name: str) -> Callable:
    """The function that runs method ``name`` in process."""
    module, _, function = METHODS[name].implementation.partition(":")
    return getattr(importlib.import_module(module), function)


def supporting(flag: str) -> tuple[str, ...]:
    """Names of the methods whose ``flag`` is set."""
    return tuple(n for n, s in METHODS.items() if getattr(s, flag))
