"""Authenticated encryption (AES-256-GCM) for data relayed through an untrusted server.

The associated data binds a ciphertext to its sender, receiver, protocol
session and stage, so the server can neither read, alter, redirect nor replay
it into another stage or session without the receiver noticing, provided the
key it was sealed under is the receiver's own: a server that relays its own
public key as the receiver's could read what is sealed for it. SecAgg+ closes
that gap by signed key advertisements (each client signs its keys with its
Ed25519 identity key and checks its neighbours' signatures before sealing
anything, ``protocols/secagg.py``); other uses must authenticate keys likewise.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedsecmem.crypto.errors import CryptoError

NONCE_BYTES = 12
TAG_BYTES = 16


def associated_data(sender: int, receiver: int, session: bytes, stage: str) -> bytes:
    """Canonical encoding of who sends what to whom, where and when."""
    label = stage.encode()
    return struct.pack(">QQH", sender, receiver, len(label)) + label + bytes(session)


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """``nonce || ciphertext || tag`` under a fresh random 96-bit nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, blob: bytes, ad: bytes) -> bytes:
    """Decrypt and authenticate; ``CryptoError`` names the possible causes on failure."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError(f"sealed message too short ({len(blob)} bytes)")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ad)
    except InvalidTag:
        raise CryptoError("authentication failed: wrong key, tampered ciphertext or "
                          "wrong sender/receiver/session/stage") from None
