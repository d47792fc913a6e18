"""What ``fedsecmem serve`` and ``fedsecmem join`` share: which runs can be deployed, the TLS
material of each party, and the bodies of the FedDyMem tasks (global memory, hello, scores).

A deployed run is FedDyMem with federated k-means (PCA-partition seeding, or
the private schedule with DP) over ``secagg`` or ``plain``. Not (yet) across
processes: ``ckks`` (clients would have to run the k-means driver on the
decrypted sums), the faithful ``kmeans++`` upload and the parameter-sharing
baselines; asking for them is a one-line error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fedsecmem.crypto.pki import ProvisioningError, TlsMaterial, client_name, tls_material
from fedsecmem.errors import UserError
from fedsecmem.method.client import GlobalMemory
from fedsecmem.protocols import federation_pb2 as pb
from fedsecmem.protocols.wire import Body, BodyBuilder, WireError

MAX_ITEMS = 1 << 26  # values in one global memory array


def check_deployable(cfg) -> None:
    if cfg.method != "feddymem":
        raise UserError(f"method: {cfg.method} runs in process only; serve/join run feddymem")
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


def put_memory(b: BodyBuilder, memory: GlobalMemory) -> BodyBuilder:
    b.tensor("memory_patches", np.asarray(memory.patches, np.float32))
    if memory.images is not None:
        b.tensor("memory_images", np.asarray(memory.images, np.float32))
    return b


def get_memory(payload: pb.Payload, patch_dim: int, image_dim: int | None) -> GlobalMemory | None:
    body = Body(payload, "global memory")
    if not body.has_tensor("memory_patches"):
        return None
    patches = body.tensor("memory_patches", "float32", ndim=2, shape=(None, patch_dim), max_values=MAX_ITEMS)
    images = None
    if image_dim and body.has_tensor("memory_images"):
        images = body.tensor("memory_images", "float32", ndim=2, shape=(None, image_dim), max_values=MAX_ITEMS)
    return GlobalMemory(patches, images)


def put_json(b: BodyBuilder, name: str, value) -> BodyBuilder:
    return b.text(name, json.dumps(value))


def get_json(payload: pb.Payload, name: str, what: str, max_size: int = 1 << 20):
    text = Body(payload, what).text(name, max_size)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise WireError(f"{what}: {name!r} is not JSON") from None


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
