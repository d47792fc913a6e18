"""fedsecmem: privacy-preserving federated unsupervised image anomaly detection.

The pipeline package: data, backbone, memory banks, scoring, methods, CLI.
Secure aggregation lives in ``fedsecmem.protocols`` (built on
``fedsecmem.crypto``); accounting, ledgers and reports in ``fedsecmem.audits``.
"""

__version__ = "0.1.0"
