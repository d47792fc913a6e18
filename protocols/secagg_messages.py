"""SecAgg+ messages. Each names its session and sender, so a receiver can refuse one that is
replayed from another instance or spoofed; ``nbytes`` is its payload size on the wire."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsecmem.crypto import aead, shamir

ID_BYTES = 8
SESSION_BYTES = 16
COMMITMENT_BYTES = 32  # SHA-256
SIGNATURE_BYTES = 64  # Ed25519
PUBLIC_KEY_BYTES = 32  # X25519 and Ed25519 alike
SIGNED_SHARE_BYTES = shamir.SHARE_BYTES + SIGNATURE_BYTES  # a Shamir share and its dealer's signature
# what a dealer seals for one holder: dealer and holder ids, then the signed shares of its
# self-mask seed and of its mask key
SHARE_PLAINTEXT_BYTES = 2 * ID_BYTES + 2 * SIGNED_SHARE_BYTES
SHARE_CIPHERTEXT_BYTES = aead.NONCE_BYTES + SHARE_PLAINTEXT_BYTES + aead.TAG_BYTES


@dataclass(frozen=True)
class Setup:
    """Server -> client: the instance's parameters and this client's neighbours."""

    session: bytes
    receiver: int
    neighbours: tuple[int, ...]
    threshold: int
    length: int
    bits: int
    clients: int = 0  # n of the instance (0: unknown); fewer neighbours than n - 1 is a sparse graph

    @property
    def sparse(self) -> bool:
        return 0 < len(self.neighbours) < self.clients - 1

    @property
    def nbytes(self) -> int:
        return SESSION_BYTES + ID_BYTES * (2 + len(self.neighbours)) + 4 + 8 + 1 + 4


@dataclass(frozen=True)
class AdvertiseKeys:
    """Client -> server: public keys for share encryption (c) and pairwise masks (s), a commitment
    to the self-mask seed (lets the server tell a true reconstruction from a forged one), and the
    Ed25519 key its shares are signed with (lets holders and server tell a dealt share from a forged one)."""

    session: bytes
    sender: int
    c_public: bytes
    s_public: bytes
    b_commitment: bytes = bytes(COMMITMENT_BYTES)
    signature: bytes = b""  # Ed25519 over session, sender, both keys, commitment, share key (empty: unsigned)
    share_key: bytes = b""  # Ed25519 public key of the share signatures (32 bytes; refused when missing)

    @property
    def nbytes(self) -> int:
        return (SESSION_BYTES + ID_BYTES + 2 * PUBLIC_KEY_BYTES + COMMITMENT_BYTES + len(self.signature)
                + len(self.share_key))


@dataclass(frozen=True)
class NeighbourKeys:
    """Server -> client: the advertised keys of its neighbours who are still there."""

    session: bytes
    receiver: int
    keys: dict[int, tuple[bytes, bytes]]
    proofs: dict[int, bytes] = field(default_factory=dict)  # neighbour -> its commitment + signature
    share_keys: dict[int, bytes] = field(default_factory=dict)  # neighbour -> its share-signing key

    @property
    def nbytes(self) -> int:
        return (SESSION_BYTES + ID_BYTES + len(self.keys) * (ID_BYTES + 2 * PUBLIC_KEY_BYTES)
                + sum(ID_BYTES + len(v) for v in self.proofs.values())
                + sum(ID_BYTES + len(v) for v in self.share_keys.values()))


@dataclass(frozen=True)
class EncryptedShares:
    """Client -> server: for each neighbour, AES-GCM(shares of my self-mask seed and mask key, each
    signed by me for that neighbour)."""

    session: bytes
    sender: int
    ciphertexts: dict[int, bytes]

    @property
    def nbytes(self) -> int:
        return SESSION_BYTES + ID_BYTES + sum(ID_BYTES + len(c) for c in self.ciphertexts.values())


@dataclass(frozen=True)
class SharesForYou:
    """Server -> client: the ciphertexts its neighbours addressed to it."""

    session: bytes
    receiver: int
    ciphertexts: dict[int, bytes]

    @property
    def nbytes(self) -> int:
        return SESSION_BYTES + ID_BYTES + sum(ID_BYTES + len(c) for c in self.ciphertexts.values())


@dataclass(frozen=True)
class MaskedInput:
    """Client -> server: the input plus self mask plus pairwise masks, in Z_(2^bits)."""

    session: bytes
    sender: int
    vector: np.ndarray

    @property
    def nbytes(self) -> int:
        return SESSION_BYTES + ID_BYTES + int(self.vector.nbytes)


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> client: which neighbours sent a masked input and which dropped after sharing."""

    session: bytes
    receiver: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return SESSION_BYTES + ID_BYTES * (1 + len(self.survivors) + len(self.dropped))


@dataclass(frozen=True)
class UnmaskShares:
    """Client -> server: shares of survivors' self-mask seeds and of dropped clients' mask keys, each
    followed by the signature its dealer gave it (``SIGNED_SHARE_BYTES``)."""

    session: bytes
    sender: int
    self_mask_shares: dict[int, bytes]
    key_shares: dict[int, bytes]

    @property
    def nbytes(self) -> int:
        items = list(self.self_mask_shares.values()) + list(self.key_shares.values())
        return SESSION_BYTES + ID_BYTES + sum(ID_BYTES + len(s) for s in items)
