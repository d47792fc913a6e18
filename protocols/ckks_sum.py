"""CKKS secure sum as sans-IO client and server state machines (TenSEAL).

Threat model. Clients share one CKKS secret key from a key authority (made
before the run, delivered over private channels); the server holds only the
public context. The server adds the clients' ciphertexts and returns the
encrypted sum; only clients can decrypt it, so the server learns nothing but
sizes and who took part, and never the sum itself. Any single client, holding
the secret key, could decrypt another client's ciphertext if it obtained it:
the server must not collude with a client (a stronger assumption than
SecAgg+'s threshold). Dropouts are free: the sum covers whoever sent.
CKKS ciphertexts are malleable and carry no integrity: the transport (mutual
TLS) and the ledger's digests guard them. Each message carries a fingerprint
of the public context, so a ciphertext made under another key set is refused
instead of decrypting to noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedsecmem.crypto import ckks
from fedsecmem.crypto.errors import CryptoError
from fedsecmem.protocols.errors import ProtocolError
from fedsecmem.protocols.secagg_messages import ID_BYTES, SESSION_BYTES

FINGERPRINT_BYTES = 16


def fingerprint(public_context: bytes) -> bytes:
    return hashlib.sha256(public_context).digest()[:FINGERPRINT_BYTES]


@dataclass(frozen=True)
class EncryptedInput:
    session: bytes
    sender: int
    key_fingerprint: bytes
    chunks: list[bytes]

    @property
    def nbytes(self) -> int:
        return SESSION_BYTES + ID_BYTES + FINGERPRINT_BYTES + sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class EncryptedSum:
    session: bytes
    key_fingerprint: bytes
    contributors: tuple[int, ...]
    chunks: list[bytes]

    @property
    def nbytes(self) -> int:
        return (SESSION_BYTES + FINGERPRINT_BYTES + ID_BYTES * len(self.contributors)
                + sum(len(c) for c in self.chunks))


class CkksClient:
    """A client holding the secret context: encrypts its input, decrypts the sum."""

    def __init__(self, cid: int, secret_context: bytes, public_context: bytes, params: ckks.CkksParams):
        self.cid = cid
        self.ctx = ckks.load_context(secret_context)
        self.fp = fingerprint(public_context)
        self.params = params

    def encrypt(self, session: bytes, x: np.ndarray, parties: int) -> EncryptedInput:
        return EncryptedInput(session, self.cid, self.fp, ckks.encrypt(self.ctx, x, self.params, parties))

    def decrypt(self, msg: EncryptedSum, length: int) -> np.ndarray:
        if msg.key_fingerprint != self.fp:
            raise ProtocolError(f"client {self.cid}: sum encrypted under another key set")
        try:
            return ckks.decrypt(self.ctx, msg.chunks, length)
        except CryptoError as exc:
            raise ProtocolError(f"client {self.cid}: {exc}") from None


class CkksServer:
    """Adds ciphertexts with the public context only."""

    def __init__(self, public_context: bytes, session: bytes, clients: set[int], length: int, slots: int):
        self.ctx = ckks.load_context(public_context)
        if self.ctx.is_private():
            raise ProtocolError("server: the CKKS context given to the server holds the secret key")
        self.fp = fingerprint(public_context)
        self.session = session
        self.clients = set(clients)
        self.chunks = -(-max(1, length) // slots)
        self.inbox: dict[int, EncryptedInput] = {}
        self.rejected = 0

    def receive(self, msg: EncryptedInput) -> None:
        try:
            if not isinstance(msg, EncryptedInput):
                raise ProtocolError(f"server: {type(msg).__name__} refused, expected EncryptedInput")
            if msg.session != self.session:
                raise ProtocolError(f"server: message from client {msg.sender} for another session (replay?)")
            if msg.sender not in self.clients or msg.sender in self.inbox:
                raise ProtocolError(f"server: client {msg.sender} unexpected or duplicate")
            if msg.key_fingerprint != self.fp:
                raise ProtocolError(f"server: client {msg.sender} encrypted under another key set")
            if len(msg.chunks) != self.chunks:
                raise ProtocolError(f"server: client {msg.sender} sent {len(msg.chunks)} chunks, expected {self.chunks}")
        except ProtocolError:
            self.rejected += 1
            raise
        self.inbox[msg.sender] = msg

    def close_stage(self) -> EncryptedSum:
        if not self.inbox:
            raise ProtocolError("server: no encrypted inputs arrived")
        try:
            total = ckks.add(self.ctx, [m.chunks for m in self.inbox.values()])
        except CryptoError as exc:
            raise ProtocolError(f"server: {exc}") from None
        return EncryptedSum(self.session, self.fp, tuple(sorted(self.inbox)), total)
