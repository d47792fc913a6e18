"""What ``fedsecmem serve`` and ``fedsecmem join`` check and share outside the messages: which runs
can be deployed, the TLS material of each party, the message size limit and fault injection.

A deployed run is FedDyMem with federated k-means (PCA-partition seeding, or
the private schedule with DP) over ``secagg`` or ``plain``. Not (yet) across
processes: ``ckks`` (clients would have to run the k-means driver on the
decrypted sums), the faithful ``kmeans++`` upload and the parameter-sharing
baselines; asking for them is a one-line error.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedsecmem.crypto.pki import ProvisioningError, TlsMaterial, client_name, tls_material
from fedsecmem.errors import UserError
from fedsecmem.methods import METHODS, supporting

__all__ = [
    "FAULT_ENV", "FAULT_EXIT", "check_deployable", "client_tls", "crash_if_asked", "max_bytes", "party_tls",
]

def check_deployable(cfg) -> None:
    if not METHODS[cfg.method].deployable:
        raise UserError(f"method: {cfg.method} runs in process only; serve/join run {', '.join(supporting('deployable'))}")
    if cfg.protocol not in ("plain", "secagg"):
        raise UserError(f"protocol: {cfg.protocol} is not available across processes yet; use secagg")
    if cfg.kmeans_init == "kmeans++" and not cfg.privacy.dp:
        raise UserError("feddymem.kmeans_init: kmeans++ uploads every prototype; serve/join run "
                        "federated k-means (set feddymem.kmeans_init=pca-partition)")
    if cfg.deploy.certs is None:
        raise UserError("deploy.certs: the folder from `fedsecmem provision` is required")


def party_tls(cfg, party: str) -> TlsMaterial:
    try:
        return tls_material(Path(cfg.deploy.certs), party)
    except ProvisioningError as exc:
        raise UserError(f"deploy.certs: {exc}") from None


def client_tls(cfg, cid: int) -> TlsMaterial:
    return party_tls(cfg, client_name(cid))


def max_bytes(cfg) -> int:
    return cfg.deploy.max_message_mb << 20


FAULT_ENV = "FEDSECMEM_FAULT"
FAULT_EXIT = 75


def crash_if_asked(role: str, **where) -> None:
    """Fault injection for tests and drills: with ``FEDSECMEM_FAULT="role=client-2,kind=secagg_relay,round=2"``
    (or ``role=server,after_round=1``) the matching process dies on the spot, as a crash would: no
    cleanup, no goodbye, exit code 75."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    if want.get("role") != role:
        return
    if all(str(where.get(k)) == v for k, v in want.items() if k != "role"):
        os._exit(FAULT_EXIT)
