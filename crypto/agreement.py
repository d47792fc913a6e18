"""Key agreement: X25519 Diffie-Hellman followed by HKDF-SHA256.

Every derived key is bound to an ``info`` string naming its purpose (and the
protocol session), so one shared secret never keys two different things.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsecmem.crypto.errors import CryptoError

KEY_BYTES = 32


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair; ``public`` is the 32-byte raw encoding that travels."""

    private: X25519PrivateKey
    public: bytes

    def private_bytes(self) -> bytes:
        """Raw 32-byte private key (what SecAgg+ secret-shares for dropout recovery)."""
        return self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())


def generate_keypair() -> KeyPair:
    """A fresh key pair from the operating system's CSPRNG."""
    return keypair_from_private(X25519PrivateKey.generate())


def keypair_from_private(private: X25519PrivateKey | bytes) -> KeyPair:
    if isinstance(private, bytes):
        if len(private) != KEY_BYTES:
            raise CryptoError(f"X25519 private key must be {KEY_BYTES} bytes, got {len(private)}")
        private = X25519PrivateKey.from_private_bytes(private)
    return KeyPair(private, private.public_key().public_bytes(serialization.Encoding.Raw,
                                                              serialization.PublicFormat.Raw))


def hkdf(secret: bytes, info: bytes, length: int = KEY_BYTES, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` for the purpose named by ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def agree(private: X25519PrivateKey | KeyPair, peer_public: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """X25519 shared secret with ``peer_public`` expanded by HKDF-SHA256 under ``info``.

    Raises ``CryptoError`` for a malformed peer key or a low-order point (all-zero secret)."""
    if isinstance(private, KeyPair):
        private = private.private
    if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != KEY_BYTES:
        raise CryptoError(f"peer public key must be {KEY_BYTES} raw bytes")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as exc:  # low-order point: the shared secret would be all zeros
        raise CryptoError(f"key agreement failed: {exc}") from None
    return hkdf(shared, info, length)
