"""The FedDyMem round's messages on the wire (``fedsecmem.method.round``'s dataclasses as protobuf
bodies): what crosses the network per task, decoded with bounds so that a malformed or hostile
body is a ``WireError``, never a crash. docs/deployment.md lists what leaves a client per task.

task kinds (server -> client) and replies: ``hello`` -> ``hello`` (sizes, DP-SGD plan, products),
``round`` (``RoundTask``) -> ``ready`` (``Ready``), ``memory`` (the global memory) -> ``scores``
(the round's metrics), ``finish`` -> ``bye`` (the client's evaluation row against the last global
memory it scored, as the simulator evaluates once after the last round).
"""

from __future__ import annotations

import json

import numpy as np

from fedsecmem.method.client import GlobalMemory
from fedsecmem.method.round import Ready, RoundTask
from fedsecmem.protocols import federation_pb2 as pb
from fedsecmem.protocols.wire import Body, BodyBuilder, WireError

__all__ = [
    "MAX_ITEMS", "decode_bye", "decode_ready", "decode_scores", "decode_task", "encode_ready", "encode_task", "get_json",
    "get_memory", "put_json", "put_memory", "row_metrics",
]

MAX_ITEMS = 1 << 26  # values in one global memory array


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


def encode_task(task: RoundTask) -> pb.Payload:
    b = BodyBuilder().int("train", int(task.train)).float("z", task.z if task.z is not None else 0.0)
    if task.memory is not None:
        put_memory(b, task.memory)
    return b.build()


def decode_task(payload: pb.Payload, r: int, dp: bool, patch_dim: int, image_dim: int | None) -> RoundTask:
    """A ``round`` task; ``z`` is read only by a private run's client."""
    body = Body(payload, "round")
    z = body.float("z", 0.0) if dp else None
    return RoundTask(r, body.int("train", 0, 1) == 1, z, get_memory(payload, patch_dim, image_dim))


def encode_ready(ready: Ready, private: bool) -> pb.Payload:
    """The ``ready`` reply; a private run's client sends no training loss and no exact counts (values of
    its data that no noise covers): only whether it holds points and image embeddings (1 or 0); the
    private k-means needs no point count."""
    b = BodyBuilder().int("n_prototypes", min(ready.n_prototypes, 1) if private else ready.n_prototypes)
    b.int("trained", int(ready.trained))
    if not private:
        b.float("loss", ready.loss)
    b.int("n_images", min(ready.n_images, 1) if private else ready.n_images)
    return b.build()


def decode_ready(cid: int, env) -> Ready:
    b = Body(env.body, "ready")
    loss = b.float("loss") if "loss" in env.body.floats else None
    return Ready(b.int("n_prototypes", 1, 1 << 31), b.int("n_images", 0, 1 << 31), b.int("trained", 0, 1) == 1, loss)


WITHHELD = "withheld"  # a private run's client keeps its evaluation (docs/privacy.md)


def _row(env, what: str, fields: set[str]) -> dict:
    """A client's row in a ``what`` reply: ``{"withheld": true}`` (a private run), or a dict holding
    at least ``fields``."""
    row = get_json(env.body, "row", what)
    if isinstance(row, dict) and row == {WITHHELD: True}:
        return row
    if not isinstance(row, dict) or not fields <= set(row):
        raise ValueError(f"{what}: row lacks {sorted(fields - set(row)) if isinstance(row, dict) else 'its fields'}")
    return row


def decode_scores(cid: int, env) -> dict:
    """A client's ``scores`` reply: the round's metrics (``round_*``), its test and bank sizes; in a
    private run only ``{"withheld": true}``."""
    return _row(env, "scores", {"n_test", "bank_size"})


def decode_bye(cid: int, env) -> dict | None:
    """A client's ``bye``: its evaluation row (None when it scored no global memory); in a private
    run only ``{"withheld": true}`` (the client keeps its row in its own folder)."""
    return _row(env, "bye", {"auroc_patch", "auroc_image", "n_test"}) if "row" in env.body.texts else None


def row_metrics(row: dict) -> dict:
    """The round metrics of a ``scores`` row, as ``Scored.metrics()`` gives them in process."""
    return {"image_patch_max": row.get("round_image_patch_max"), "image_knn": row.get("round_image_knn"),
            "global_used": row.get("round_global_used")}
