"""One interface for every protocol: the sum of the clients' vectors, computed in-process by
driving the sans-IO state machines (the simulator; the network transport drives the same ones).

Backends and what the aggregator learns (threat models in ``secagg.py`` and ``ckks_sum.py``):
``plain`` (vectors in the clear: the server sees every input; the reference), ``secagg``
(SecAgg+ masking of fixed-point encodings: the server sees the sum only), ``ckks`` (TenSEAL
CKKS: the server sees ciphertexts only; clients decrypt the sum). ``drop`` simulates clients vanishing before they send
at a given stage (``advertise``, ``share``, ``mask``, ``unmask`` for secagg; ``mask`` means
"before sending the input" for every backend).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsecmem.crypto import ckks
from fedsecmem.crypto.fixed_point import FixedPoint
from fedsecmem.protocols.ckks_sum import CkksClient, CkksServer
from fedsecmem.protocols.errors import ProtocolAbort
from fedsecmem.protocols.secagg import SecAggClient, SecAggServer, make_params
from fedsecmem.protocols.secagg_messages import SESSION_BYTES

DROP_STAGES = ("advertise", "share", "mask", "unmask")

Tap = Callable[[str, int, str, Callable[[], bytes]], None]
"""Sees every message of a sum as it would cross the network: ``(direction, client, stage, data)``
with direction ``"up"`` (client to server) or ``"down"``, and ``data()`` its exact bytes (made only
when asked: a ledger hashes them, nothing else needs them)."""


def message_bytes(msg) -> bytes:
    """The bytes a protocol message travels as: SecAgg+ messages in their wire encoding, CKKS
    messages as their fields and ciphertext chunks, vectors as their raw values."""
    if isinstance(msg, np.ndarray):
        return np.ascontiguousarray(msg).tobytes()
    if hasattr(msg, "chunks"):  # CKKS
        head = [msg.session, msg.key_fingerprint]
        return b"".join(head + list(msg.chunks))
    from fedsecmem.protocols.wire import encode_secagg

    return encode_secagg(msg).SerializeToString(deterministic=True)


def _tapped(tap: Tap | None, direction: str, cid: int, stage: str, msg) -> None:
    if tap is not None:
        tap(direction, cid, stage, lambda: message_bytes(msg))


@dataclass
class SumOutcome:
    total: np.ndarray  # float64 sum over ``included``
    included: tuple[int, ...]  # clients whose input is in the sum
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    client_seconds: float = 0.0  # all clients together
    server_seconds: float = 0.0
    visible_to: str = "server"  # who learns the sum: "server" or "clients"
    seen: dict[int, np.ndarray] | None = None  # each input as the server received it (plain only)


@dataclass
class Traffic:
    """Bytes each client sent and received, and seconds spent, over one or more secure sums."""

    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    sums: int = 0

    def send_up(self, cid: int, nbytes: int) -> None:
        self.bytes_up[cid] = self.bytes_up.get(cid, 0) + int(nbytes)

    def send_down(self, cid: int, nbytes: int) -> None:
        self.bytes_down[cid] = self.bytes_down.get(cid, 0) + int(nbytes)

    def merge(self, other: "Traffic") -> None:
        for c, b in other.bytes_up.items():
            self.send_up(c, b)
        for c, b in other.bytes_down.items():
            self.send_down(c, b)
        self.client_seconds += other.client_seconds
        self.server_seconds += other.server_seconds
        self.sums += other.sums

    def add(self, out: "SumOutcome") -> None:
        self.merge(Traffic(out.bytes_up, out.bytes_down, out.client_seconds, out.server_seconds, 1))


def _check_inputs(inputs: Mapping[int, np.ndarray]) -> int:
    if not inputs:
        raise ValueError("secure sum: no inputs")
    lengths = {np.asarray(v).size for v in inputs.values()}
    if len(lengths) != 1:
        raise ValueError(f"secure sum: clients' vectors differ in length {sorted(lengths)}")
    return lengths.pop()


def _drops(drop: Mapping[str, Iterable[int]] | None) -> dict[str, set[int]]:
    drop = {k: set(v) for k, v in (drop or {}).items()}
    bad = set(drop) - set(DROP_STAGES)
    if bad:
        raise ValueError(f"secure sum: unknown dropout stages {sorted(bad)}, expected {DROP_STAGES}")
    return drop


class SecureSum:
    name = "abstract"
    tap: Tap | None = None  # set by whoever keeps a ledger of the messages

    def sum(self, inputs: Mapping[int, np.ndarray], drop: Mapping[str, Iterable[int]] | None = None,
            min_included: int = 1) -> SumOutcome:
        """The sum over the clients that make it; ``ProtocolAbort`` (nothing revealed) if fewer than
        ``min_included`` inputs would be in it."""
        raise NotImplementedError


class PlainSum(SecureSum):
    """Reference: the server sees every vector, sent as ``wire`` floats (float32 by default, as a
    model update would travel; float64 for an exact reference)."""

    name = "plain"

    def __init__(self, wire: str = "float32"):
        if wire not in ("float32", "float64"):
            raise ValueError(f"plain: wire must be float32 or float64, got {wire!r}")
        self.wire = np.dtype(wire)

    def sum(self, inputs, drop=None, min_included: int = 1) -> SumOutcome:
        _check_inputs(inputs)
        d = _drops(drop)
        gone = d.get("advertise", set()) | d.get("share", set()) | d.get("mask", set())
        t = time.perf_counter()
        included = tuple(sorted(c for c in inputs if c not in gone))
        if len(included) < min_included:
            raise ProtocolAbort(f"plain: only {len(included)} inputs, at least {min_included} needed")
        # the sum is taken in float64 over what travels
        sent = {c: np.asarray(inputs[c], self.wire).ravel() for c in included}
        for c in included:
            _tapped(self.tap, "up", c, "plain", sent[c])
        total = np.sum([sent[c].astype(np.float64) for c in included], axis=0)
        up = {c: np.asarray(inputs[c]).size * self.wire.itemsize for c in included}
        return SumOutcome(total, included, up, {c: 0 for c in included},
                          server_seconds=time.perf_counter() - t, seen=sent)


@dataclass
class SecAggRun:
    """What driving one SecAgg+ instance produced: the ring sum, every message, the server's
    seconds per stage."""

    total: np.ndarray
    clients: dict[int, SecAggClient]
    transcript: list
    close_seconds: dict[str, float]


def drive_secagg(server: SecAggServer, encoded: Mapping[int, np.ndarray], drop: Mapping[str, set[int]] | None = None,
                 meter: Traffic | None = None, tap: Tap | None = None) -> SecAggRun:
    """Run every stage of ``server``'s instance with one client state machine per input, in process.

    ``drop[stage]``: clients that vanish before sending at that stage. A client that refuses to go
    on (``ProtocolAbort``) is, to the server, a client that dropped out. ``meter`` (optional) counts
    bytes and client/server seconds; ``tap`` (optional) sees every message."""
    drop = drop or {}
    meter = meter if meter is not None else Traffic()
    setups = server.setups()
    # in process every client signs its advertised keys with a fresh Ed25519 key of this instance
    signers = {c: Ed25519PrivateKey.generate() for c in sorted(encoded)}
    verify_keys = {c: k.public_key() for c, k in signers.items()}
    machines = {}
    for c in sorted(encoded):
        meter.send_down(c, setups[c].nbytes)
        _tapped(tap, "down", c, "setup", setups[c])
        t = time.perf_counter()
        machines[c] = SecAggClient(c, setups[c], signers[c], verify_keys)
        meter.client_seconds += time.perf_counter() - t
    transcript, close_seconds = [], {}
    outgoing = {c: None for c in machines}
    for stage in DROP_STAGES:
        for c, incoming in outgoing.items():
            if c in drop.get(stage, ()):
                continue
            cl = machines[c]
            t = time.perf_counter()
            try:
                if stage == "advertise":
                    msg = cl.advertise()
                elif stage == "share":
                    msg = cl.share_keys(incoming)
                elif stage == "mask":
                    msg = cl.mask(incoming, encoded[c])
                else:
                    msg = cl.unmask(incoming)
            except ProtocolAbort:
                continue
            finally:
                meter.client_seconds += time.perf_counter() - t
            transcript.append(msg)
            meter.send_up(c, msg.nbytes)
            _tapped(tap, "up", c, stage, msg)
            t = time.perf_counter()
            server.receive(msg)
            meter.server_seconds += time.perf_counter() - t
        t = time.perf_counter()
        result = server.close_stage()
        close_seconds[stage] = time.perf_counter() - t
        meter.server_seconds += close_seconds[stage]
        if stage != "unmask":
            outgoing = result
            for c, msg in outgoing.items():
                meter.send_down(c, msg.nbytes)
                _tapped(tap, "down", c, stage, msg)
    return SecAggRun(result, machines, transcript, close_seconds)


class SecAggSum(SecureSum):
    """SecAgg+ over fixed-point encodings in Z_(2^bits)."""

    name = "secagg"

    def __init__(self, bits: int = 64, frac_bits: int = 24, neighbours: int | None = None,
                 threshold: int | None = None, rounding: str = "nearest"):
        self.bits, self.frac_bits = bits, frac_bits
        self.neighbours, self.threshold, self.rounding = neighbours, threshold, rounding

    def fixed_point(self, parties: int) -> FixedPoint:
        return FixedPoint(self.bits, self.frac_bits, parties)

    def params(self, clients: list[int], length: int):
        """A fresh SecAgg+ instance for ``clients`` (the graph degree capped at n - 1)."""
        k = self.neighbours if self.neighbours is None else min(self.neighbours, len(clients) - 1)
        return make_params(sorted(clients), length, self.bits, k, self.threshold)

    def sum(self, inputs, drop=None, min_included: int = 1) -> SumOutcome:
        length = _check_inputs(inputs)
        drop = _drops(drop)
        meter = Traffic()
        clients = sorted(inputs)
        fp = self.fixed_point(len(clients))
        t = time.perf_counter()
        encoded = {c: fp.encode(inputs[c], self.rounding) for c in clients}  # refuses overflow up front
        meter.client_seconds += time.perf_counter() - t
        params = self.params(clients, length)
        t = time.perf_counter()
        server = SecAggServer(params, min_included)
        meter.server_seconds += time.perf_counter() - t
        result = drive_secagg(server, encoded, drop, meter, self.tap).total
        total = fp.decode(result)
        return SumOutcome(total, tuple(sorted(server.masked)), meter.bytes_up, meter.bytes_down,
                          meter.client_seconds, meter.server_seconds)


class CkksSum(SecureSum):
    """CKKS: one key set for the whole run; the server adds, the clients decrypt."""

    name = "ckks"

    def __init__(self, params: ckks.CkksParams = ckks.CkksParams()):
        self.params = params
        self.authority = ckks.KeyAuthority(params)
        self.public = self.authority.public_context()
        self._secret = self.authority.secret_context()
        self._clients: dict[int, CkksClient] = {}

    def client(self, cid: int) -> CkksClient:
        if cid not in self._clients:
            self._clients[cid] = CkksClient(cid, self._secret, self.public, self.params)
        return self._clients[cid]

    @property
    def context_bytes(self) -> int:
        """Size of the public context the server receives once per run."""
        return len(self.public)

    def sum(self, inputs, drop=None, min_included: int = 1) -> SumOutcome:
        length = _check_inputs(inputs)
        drop = _drops(drop)
        meter = Traffic()
        clients = sorted(inputs)
        session = os.urandom(SESSION_BYTES)
        t = time.perf_counter()
        server = CkksServer(self.public, session, set(clients), length, self.params.slots)
        meter.server_seconds += time.perf_counter() - t
        gone = drop.get("advertise", set()) | drop.get("share", set()) | drop.get("mask", set())
        for c in clients:
            if c in gone:
                continue
            t = time.perf_counter()
            msg = self.client(c).encrypt(session, inputs[c], len(clients))
            meter.client_seconds += time.perf_counter() - t
            meter.send_up(c, msg.nbytes)
            _tapped(self.tap, "up", c, "encrypted_input", msg)
            t = time.perf_counter()
            server.receive(msg)
            meter.server_seconds += time.perf_counter() - t
        if not server.inbox:
            raise ProtocolAbort("ckks: no client sent an input")
        if len(server.inbox) < min_included:  # before the sum is formed and handed out for decryption
            raise ProtocolAbort(f"ckks: only {len(server.inbox)} inputs, at least {min_included} needed")
        t = time.perf_counter()
        result = server.close_stage()
        meter.server_seconds += time.perf_counter() - t
        total = None
        for c in result.contributors:
            if c in drop.get("unmask", set()):
                continue
            meter.send_down(c, result.nbytes)
            _tapped(self.tap, "down", c, "encrypted_sum", result)
            t = time.perf_counter()
            total = self.client(c).decrypt(result, length)
            meter.client_seconds += time.perf_counter() - t
        if total is None:
            raise ProtocolAbort("ckks: no client is left to decrypt the sum")
        return SumOutcome(total, result.contributors, meter.bytes_up, meter.bytes_down, meter.client_seconds,
                          meter.server_seconds,
                          visible_to="clients")


def make_secure_sum(protocol: str, **options) -> SecureSum:
    """``plain`` (option: wire) | ``secagg`` (options: bits, frac_bits, neighbours, threshold, rounding) |
    ``ckks`` (option: params)."""
    backends = {"plain": PlainSum, "secagg": SecAggSum, "ckks": CkksSum}
    if protocol not in backends:
        raise ValueError(f"protocol must be one of {sorted(backends)}, got {protocol!r}")
    return backends[protocol](**options)
