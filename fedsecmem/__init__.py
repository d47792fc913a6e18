"""fedsecmem: privacy-preserving federated unsupervised image anomaly detection.

The pipeline package: data, backbone, memory banks, scoring, methods, CLI.
Secure aggregation lives in ``fedsecmem.protocols`` (built on
``fedsecmem.crypto``); accounting, ledgers and reports in ``fedsecmem.audits``.

The public API (``fedsecmem.run``, ``fedsecmem.Detector``, docs/api.md) is loaded on first use,
so ``import fedsecmem`` stays cheap and the layers below never import it.
"""

from importlib import import_module

__version__ = "0.1.0"
_API = ("Detector", "Prediction", "Predictions", "Results")


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module("fedsecmem.api"), name)
    if name == "run":  # the subpackage, callable: fedsecmem.run(config, out=...)
        return import_module("fedsecmem.run")
    raise AttributeError(f"module 'fedsecmem' has no attribute {name!r}")
