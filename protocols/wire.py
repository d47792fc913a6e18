"""Bytes on the wire: envelopes, chunks, and strict codecs for every message body.

Everything a party receives is untrusted until it has been decoded here: a
``Body`` reader checks that each field is present, of the right type, inside
its bounds, and that every array's dtype, shape and byte count agree. Anything
else raises ``WireError`` (one line naming the field), which the transport
turns into a refused message; nothing malformed reaches a state machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from google.protobuf.message import DecodeError

from fedsecmem.protocols import federation_pb2 as pb
from fedsecmem.protocols.kmeans_party import (
    DP_ASSIGN, REQUESTS, CellStats, LloydStats, Moments, PartitionStats, Pca, PrivateCells, Request, plan_of,
)
from fedsecmem.protocols.secagg_messages import (
    COMMITMENT_BYTES, PUBLIC_KEY_BYTES, SESSION_BYTES, SHARE_CIPHERTEXT_BYTES, SIGNATURE_BYTES, SIGNED_SHARE_BYTES,
    AdvertiseKeys, EncryptedShares, MaskedInput, NeighbourKeys, Setup, SharesForYou, UnmaskRequest, UnmaskShares,
)

SERVER_ID = -1
CHUNK_BYTES = 1 << 20  # 1 MiB pieces: well under gRPC's 4 MB default message limit
DTYPES = {"float32", "float64", "int64", "uint32", "uint64"}
MAX_DIMS = 4
MAX_ID = 2**31 - 1


class WireError(ValueError):
    """A message that does not decode to what its kind promises."""


# ---- envelopes and chunks -------------------------------------------------------------------------

@dataclass(frozen=True)
class Envelope:
    run_id: str
    sender: int
    round: int
    step: int
    kind: str
    body: pb.Payload

    def to_bytes(self) -> bytes:
        return pb.Envelope(run_id=self.run_id, sender=self.sender, round=self.round, step=self.step,
                           kind=self.kind, body=self.body).SerializeToString()


def parse_envelope(data: bytes) -> Envelope:
    """Decode an envelope (the body is decoded later, by the kind's codec)."""
    msg = pb.Envelope()
    try:
        msg.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise WireError(f"not an envelope ({type(exc).__name__})") from None
    if not msg.kind or len(msg.kind) > 64:
        raise WireError("envelope: missing or overlong kind")
    if len(msg.run_id) > 64:
        raise WireError("envelope: overlong run id")
    if not SERVER_ID <= msg.sender <= MAX_ID:
        raise WireError(f"envelope: sender {msg.sender} out of range")
    return Envelope(msg.run_id, msg.sender, msg.round, msg.step, msg.kind, msg.body)


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[pb.Chunk]:
    """``data`` as a stream of chunks, each naming the total size (at least one chunk)."""
    view = memoryview(data)
    total = len(data)
    yield pb.Chunk(total_size=total, data=bytes(view[:size]))
    for start in range(size, total, size):
        yield pb.Chunk(total_size=total, data=bytes(view[start : start + size]))


def join_chunks(stream: Iterable[pb.Chunk], limit: int) -> bytes:
    """Reassemble a chunk stream; refuses a declared or actual size above ``limit`` before reading on,
    and a stream whose pieces do not add up to what it declared."""
    parts: list[bytes] = []
    total, declared = 0, None
    for ch in stream:
        if declared is None:
            declared = ch.total_size
            if declared > limit:
                raise WireError(f"message of {declared} bytes is over the limit of {limit} bytes")
        elif ch.total_size != declared:
            raise WireError("chunks disagree on the message size")
        total += len(ch.data)
        if total > declared:
            raise WireError(f"chunks carry more than the declared {declared} bytes")
        parts.append(ch.data)
    if declared is None:
        raise WireError("empty chunk stream")
    if total != declared:
        raise WireError(f"chunk stream ended at {total} of {declared} bytes")
    return b"".join(parts)


# ---- bodies ---------------------------------------------------------------------------------------

class BodyBuilder:
    """Writes a ``Payload`` field by field."""

    def __init__(self):
        self.p = pb.Payload()

    def tensor(self, name: str, a: np.ndarray) -> "BodyBuilder":
        a = np.ascontiguousarray(a)
        if a.dtype.name not in DTYPES:
            raise WireError(f"{name}: dtype {a.dtype} cannot travel")
        t = self.p.tensors[name]
        t.dtype = a.dtype.name
        t.shape.extend(a.shape)
        t.data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        return self

    def blob(self, name: str, b: bytes) -> "BodyBuilder":
        self.p.blobs[name] = bytes(b)
        return self

    def int(self, name: str, v: int) -> "BodyBuilder":
        self.p.ints[name] = int(v)
        return self

    def float(self, name: str, v: float) -> "BodyBuilder":
        self.p.floats[name] = float(v)
        return self

    def text(self, name: str, s: str) -> "BodyBuilder":
        self.p.texts[name] = s
        return self

    def id_blobs(self, name: str, items: dict[int, bytes]) -> "BodyBuilder":
        entry = self.p.id_blobs[name]
        for k, v in items.items():
            entry.items[int(k)] = bytes(v)
        return self

    def build(self) -> pb.Payload:
        return self.p


class Body:
    """Strict reader of a ``Payload``: every accessor checks presence, type and bounds."""

    def __init__(self, payload: pb.Payload, what: str):
        self.p = payload
        self.what = what

    def _fail(self, msg: str) -> WireError:
        return WireError(f"{self.what}: {msg}")

    def has_tensor(self, name: str) -> bool:
        return name in self.p.tensors

    def tensor(self, name: str, dtypes: set[str] | str, ndim: int | None = None, max_values: int = 1 << 31,
               shape: tuple | None = None) -> np.ndarray:
        if name not in self.p.tensors:
            raise self._fail(f"missing array {name!r}")
        t = self.p.tensors[name]
        allowed = {dtypes} if isinstance(dtypes, str) else dtypes
        if t.dtype not in allowed:
            raise self._fail(f"array {name!r} has dtype {t.dtype!r}, expected {sorted(allowed)}")
        dims = tuple(int(s) for s in t.shape)
        if len(dims) > MAX_DIMS or (ndim is not None and len(dims) != ndim):
            raise self._fail(f"array {name!r} has {len(dims)} dimensions")
        n = math.prod(dims)
        if n > max_values:
            raise self._fail(f"array {name!r} has {n} values, at most {max_values}")
        if shape is not None and any(want is not None and want != got for want, got in zip(shape, dims)):
            raise self._fail(f"array {name!r} has shape {dims}, expected {shape}")
        dtype = np.dtype(t.dtype).newbyteorder("<")
        if len(t.data) != n * dtype.itemsize:
            raise self._fail(f"array {name!r}: {len(t.data)} bytes do not hold {dims} {t.dtype}")
        a = np.frombuffer(t.data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise self._fail(f"array {name!r} holds non-finite values")
        return a

    def blob(self, name: str, size: int | None = None, max_size: int = 1 << 16) -> bytes:
        if name not in self.p.blobs:
            raise self._fail(f"missing bytes {name!r}")
        b = self.p.blobs[name]
        if (size is not None and len(b) != size) or len(b) > max_size:
            raise self._fail(f"{name!r} has {len(b)} bytes, expected {size if size is not None else f'<= {max_size}'}")
        return b

    def int(self, name: str, lo: int = 0, hi: int = MAX_ID) -> int:
        if name not in self.p.ints:
            raise self._fail(f"missing integer {name!r}")
        v = int(self.p.ints[name])
        if not lo <= v <= hi:
            raise self._fail(f"{name!r} = {v} outside [{lo}, {hi}]")
        return v

    def has_int(self, name: str) -> bool:
        return name in self.p.ints

    def float(self, name: str, lo: float = -math.inf, hi: float = math.inf) -> float:
        if name not in self.p.floats:
            raise self._fail(f"missing number {name!r}")
        v = float(self.p.floats[name])
        if not (math.isfinite(v) or v == hi == math.inf) or not lo <= v <= hi:
            raise self._fail(f"{name!r} = {v} outside [{lo}, {hi}]")
        return v

    def text(self, name: str, max_size: int = 1 << 20) -> str:
        if name not in self.p.texts:
            raise self._fail(f"missing text {name!r}")
        s = self.p.texts[name]
        if len(s) > max_size:
            raise self._fail(f"text {name!r} is longer than {max_size}")
        return s

    def id_blobs(self, name: str, size: int | None = None, max_items: int = 1 << 16) -> dict[int, bytes]:
        if name not in self.p.id_blobs:
            raise self._fail(f"missing id map {name!r}")
        items = self.p.id_blobs[name].items
        if len(items) > max_items:
            raise self._fail(f"id map {name!r} has {len(items)} entries, at most {max_items}")
        out = {}
        for k, v in items.items():
            if not 0 <= k <= MAX_ID:
                raise self._fail(f"id map {name!r}: id {k} out of range")
            if size is not None and len(v) != size:
                raise self._fail(f"id map {name!r}: entry {k} has {len(v)} bytes, expected {size}")
            out[int(k)] = bytes(v)
        return out

    def ids(self, name: str, max_items: int = 1 << 16) -> tuple[int, ...]:
        a = self.tensor(name, "int64", ndim=1, max_values=max_items)
        if len(a) and (a.min() < 0 or a.max() > MAX_ID):
            raise self._fail(f"{name!r}: client id out of range")
        return tuple(int(v) for v in a)


# ---- SecAgg+ messages -----------------------------------------------------------------------------

def encode_secagg(msg) -> pb.Payload:
    b = BodyBuilder().blob("session", msg.session)
    if isinstance(msg, Setup):
        b.tensor("neighbours", np.array(msg.neighbours, np.int64))
        b.int("threshold", msg.threshold).int("length", msg.length).int("bits", msg.bits).int("receiver", msg.receiver)
        b.int("clients", msg.clients)
    elif isinstance(msg, AdvertiseKeys):
        b.blob("c_public", msg.c_public).blob("s_public", msg.s_public).blob("b_commitment", msg.b_commitment)
        b.blob("signature", msg.signature).blob("share_key", msg.share_key)
    elif isinstance(msg, NeighbourKeys):
        b.id_blobs("c", {k: v[0] for k, v in msg.keys.items()}).id_blobs("s", {k: v[1] for k, v in msg.keys.items()})
        b.id_blobs("proofs", msg.proofs).id_blobs("share_keys", msg.share_keys)
    elif isinstance(msg, (EncryptedShares, SharesForYou)):
        b.id_blobs("ciphertexts", msg.ciphertexts)
    elif isinstance(msg, MaskedInput):
        b.tensor("vector", msg.vector)
    elif isinstance(msg, UnmaskRequest):
        b.tensor("survivors", np.array(msg.survivors, np.int64)).tensor("dropped", np.array(msg.dropped, np.int64))
    elif isinstance(msg, UnmaskShares):
        b.id_blobs("self_mask", msg.self_mask_shares).id_blobs("keys", msg.key_shares)
    else:
        raise WireError(f"no codec for {type(msg).__name__}")
    return b.build()


def decode_secagg(kind: type, payload: pb.Payload, sender: int, receiver: int, max_length: int):
    """The SecAgg+ message of type ``kind`` in ``payload`` (sender/receiver from the envelope and the
    TLS identity, never from the body)."""
    body = Body(payload, kind.__name__)
    session = body.blob("session", SESSION_BYTES)
    if kind is Setup:
        return Setup(session, receiver, body.ids("neighbours"), body.int("threshold", 1),
                     body.int("length", 1, max_length), body.int("bits", 32, 64), body.int("clients", 0))
    if kind is AdvertiseKeys:
        signature = body.blob("signature", max_size=SIGNATURE_BYTES) if "signature" in payload.blobs else b""
        if len(signature) not in (0, SIGNATURE_BYTES):
            raise WireError(f"AdvertiseKeys: a signature is {SIGNATURE_BYTES} bytes")
        return AdvertiseKeys(session, sender, body.blob("c_public", PUBLIC_KEY_BYTES),
                             body.blob("s_public", PUBLIC_KEY_BYTES), body.blob("b_commitment", COMMITMENT_BYTES),
                             signature, body.blob("share_key", PUBLIC_KEY_BYTES))
    if kind is NeighbourKeys:
        c, s = body.id_blobs("c", PUBLIC_KEY_BYTES), body.id_blobs("s", PUBLIC_KEY_BYTES)
        share_keys = body.id_blobs("share_keys", PUBLIC_KEY_BYTES)
        if not set(c) == set(s) == set(share_keys):
            raise WireError("NeighbourKeys: key maps name different clients")
        proofs = body.id_blobs("proofs", max_items=1 << 16) if "proofs" in payload.id_blobs else {}
        if any(len(v) != COMMITMENT_BYTES + SIGNATURE_BYTES and len(v) != COMMITMENT_BYTES for v in proofs.values()):
            raise WireError("NeighbourKeys: a proof is a commitment and a signature")
        return NeighbourKeys(session, receiver, {k: (c[k], s[k]) for k in c}, proofs, share_keys)
    if kind is EncryptedShares:
        return EncryptedShares(session, sender, body.id_blobs("ciphertexts", SHARE_CIPHERTEXT_BYTES))
    if kind is SharesForYou:
        return SharesForYou(session, receiver, body.id_blobs("ciphertexts", SHARE_CIPHERTEXT_BYTES))
    if kind is MaskedInput:
        return MaskedInput(session, sender, body.tensor("vector", {"uint32", "uint64"}, ndim=1, max_values=max_length))
    if kind is UnmaskRequest:
        return UnmaskRequest(session, receiver, body.ids("survivors"), body.ids("dropped"))
    if kind is UnmaskShares:
        return UnmaskShares(session, sender, body.id_blobs("self_mask", SIGNED_SHARE_BYTES),
                            body.id_blobs("keys", SIGNED_SHARE_BYTES))
    raise WireError(f"no codec for {kind.__name__}")


# ---- k-means requests and plain vectors -----------------------------------------------------------

_REQUEST_ARRAYS = {"mean", "basis", "centres", "split_cluster", "split_child", "split_mean", "split_direction"}
_REQUEST_INTS = {"n", "m", "assign", "levels", "seed"}


def _request_fields(req: Request) -> tuple[dict[str, int], dict[str, float]]:
    """A request's integers and floats on the wire (its arrays are ``req.arrays()``)."""
    match req:
        case PartitionStats():
            return {"n": req.n, "m": req.m}, {}
        case CellStats():
            return {"n": req.n}, {}
        case PrivateCells():
            ints = {"assign": DP_ASSIGN.index(req.assign)}
            if req.assign == "hyperplanes":
                ints.update(levels=req.levels, seed=req.seed)
            return ints, {"clip": req.clip}
    return {}, {}


def encode_request(req: Request, b: BodyBuilder) -> BodyBuilder:
    b.text("op", req.op)
    ints, floats = _request_fields(req)
    for k, v in ints.items():
        b.int(f"req.{k}", v)
    for k, v in floats.items():
        b.float(f"req.{k}", v)
    for k, v in req.arrays().items():
        b.tensor(f"req.{k}", np.asarray(v))
    return b


def decode_request(payload: pb.Payload, dim: int, max_values: int) -> Request:
    """A k-means request whose arrays fit points of dimension ``dim``, checked before any party
    computes with it."""
    body = Body(payload, "request")
    op = body.text("op", 32)
    if op not in REQUESTS:
        raise WireError(f"request: unknown op {op!r}")
    i, floats, a = {}, {}, {}
    for key in payload.ints:
        name = key.removeprefix("req.")
        if not key.startswith("req.") or name not in _REQUEST_INTS:
            continue
        i[name] = body.int(key, 0, 1 << 40)
    for key in payload.floats:
        if key == "req.clip":
            floats["clip"] = body.float(key, 1e-12)
    for key in payload.tensors:
        name = key.removeprefix("req.")
        if key.startswith("req.") and name in _REQUEST_ARRAYS:
            want = "int64" if name in ("split_cluster", "split_child") else "float64"
            a[name] = body.tensor(key, want, max_values=max_values)

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise WireError(f"request {op}: {what}")

    if op == "moments":
        return Moments()
    if op in ("partition", "cells"):
        need("n" in i and i["n"] >= 1, "needs n >= 1")
        pca = None
        if "basis" in a:
            need("mean" in a and a["mean"].shape == (dim,) and a["basis"].ndim == 2 and a["basis"].shape[0] == dim,
                 "PCA mean/basis do not fit the points")
            pca = Pca(a["mean"], a["basis"])
        if "split_cluster" in a:
            p = len(a["split_cluster"])
            m = a["split_mean"].shape[1] if a.get("split_mean") is not None and a["split_mean"].ndim == 2 else -1
            need(all(k in a for k in ("split_child", "split_mean", "split_direction"))
                 and a["split_child"].shape == (p,) and a["split_mean"].shape == (p, m)
                 and a["split_direction"].shape == (p, m), "inconsistent split plan")
            need(bool((a["split_cluster"] >= 0).all() and (a["split_child"] >= 0).all()
                      and (a["split_child"] < max(i["n"], 1)).all()), "split plan names clusters out of range")
        if op == "cells":
            return CellStats(i["n"], pca, plan_of(a))
        need("m" in i and 1 <= i["m"] <= dim, "needs 1 <= m <= dim")
        return PartitionStats(i["n"], i["m"], pca, plan_of(a))
    if op == "lloyd":
        need("centres" in a and a["centres"].ndim == 2 and a["centres"].shape[1] == dim
             and len(a["centres"]) >= 1, "centres do not fit the points")
        return LloydStats(a["centres"])
    need("assign" in i and i["assign"] < len(DP_ASSIGN) and "clip" in floats, "needs assign and clip")
    assign = DP_ASSIGN[i["assign"]]
    if assign == "hyperplanes":
        need("levels" in i and i["levels"] <= 20 and "seed" in i and "mean" in a and a["mean"].shape == (dim,),
             "hyperplanes need levels <= 20, seed and a mean")
        return PrivateCells(floats["clip"], assign, i["levels"], i["seed"], mean=a["mean"])
    if assign == "nearest":
        need("centres" in a and a["centres"].ndim == 2 and a["centres"].shape[1] == dim
             and len(a["centres"]) >= 1, "centres do not fit the points")
        return PrivateCells(floats["clip"], assign, centres=a["centres"])
    return PrivateCells(floats["clip"])


def encode_vector(v: np.ndarray) -> pb.Payload:
    return BodyBuilder().tensor("vector", np.asarray(v, np.float64)).build()


def decode_vector(payload: pb.Payload, length: int) -> np.ndarray:
    return Body(payload, "vector").tensor("vector", "float64", ndim=1, shape=(length,), max_values=length)
