"""SecAgg+ (Bell et al. 2020; Bonawitz et al. 2017) as sans-IO client and server state machines.

Threat model. Honest-but-curious server; clients may drop out at any stage.
The server relays every client-to-client message, so shares travel encrypted
with AES-GCM under X25519 keys and are bound to sender, receiver, session
and stage. Each client's input is hidden by a self mask (PRG of a fresh seed
b_u) and by pairwise masks with its k neighbours (PRG of an X25519 secret,
cancelling in the sum). Both b_u and the mask private key are Shamir-shared
among the client and its neighbours with threshold t. For each client an
honest client reveals the share of *either* b_u (client alive) *or* the mask
key (client dropped after sharing), never both, so the server can strip the
masks of the sum but never of one input. With the complete graph (k = n - 1)
the server, even together with up to t - 1 clients, learns nothing about the
honest clients' inputs beyond their sum; with a sparse random graph this holds
with high probability over the graph (Bell et al.). Clients refuse to reveal
anything if fewer than t masked inputs arrived (a sum of too few is not
protected). Up to n - t clients may drop after key sharing; if any survivor's
or dropped client's secret has fewer than t shares returned, the instance
aborts with ``ProtocolAbort`` rather than reveal partial masks.
Colluding clients. Up to t - 1 clients may collude, deviating at will, to bend
the sum or to get honest clients named as cheaters (the deployment excludes a
named client for the rest of the run, so a false accusation is an attack on
the run). Shamir shares alone cannot settle blame: any t points lie on some
polynomial of degree t - 1, and t - 1 colluders can add a multiple of a
polynomial vanishing at 0 and at an honest holder's point to their shares, so
that a subset of them with that holder reconstructs the right secret and the
other honest shares look forged (a server that searched t-subsets named two
honest clients so, at n = 5); with exactly t shares back one forged share made
the honest owner look like it shared a secret other than it committed to.
So every share is individually verifiable. The dealer signs each share it
deals with Ed25519 over a domain-separated message binding the session, the
dealer, the holder, which secret (self-mask seed or mask key) and the share
(``share_signed_bytes``); the signature travels with the share inside the
AES-GCM plaintext, and the holder returns share + signature at unmasking. The
signing key is the client's provisioned identity key when it has one (the
evidence then checks against its certificate), else a fresh key of the
instance (in-process runs get the same protection against colluding clients);
either way its public half is advertised with the client's keys
(``AdvertiseKeys.share_key``, under the advertisement's identity signature
when there is one), and the server takes it from the dealer itself. A holder
checks both signatures of each share it receives, and that the share is at its
own point, before masking, and refuses a bad one (``ProtocolError``, state
unchanged): it never keeps a share it could be blamed for.
The server combines the first t shares returned of each secret and accepts the
result only if it matches what the owner advertised (the seed's SHA-256
commitment, ``seed_commitment``; the mask key's public half): a reconstruction
that matches is right whatever the shares' signatures, so an honest sum checks
no signature (checking every share of every sum cost the server 5 to 8 times
its time). Otherwise it verifies every returned share of that secret: a share
whose signature fails names its sender (the holder) in ``cheaters``, the share
and signature kept in ``evidence``, and any t validly signed shares give the
secret: the sum stays exact as long as t of them come back. If t validly
signed shares do not give what the owner advertised, the owner dealt them so:
it alone is named, its t signed shares the proof, and the instance stops with
``CheatingDetected``; so it does, naming the forgers, when forgeries leave
fewer than t valid shares (a retry without them can succeed). Nobody is named
from share values alone, and an honest client never is: the shares it deals
carry its signatures, the shares it returns its dealers' (a client advertising
a weak share key only lets forgeries of its own shares pass as its own: then
it is the one named). A holder that withholds a share is a dropout, not a
cheater. A client can still make its holders drop out by dealing them bad
shares, as with a garbled ciphertext: denial of service is not covered.
Key substitution (Bonawitz et al.'s active server relaying its own key as a
neighbour's, to read the shares sealed for it or to pass off shares as that
neighbour's) is refused: each client signs its advertised keys, seed
commitment and share-signing key with its Ed25519 identity key (the
provisioned key when deployed, a fresh key per instance in process) and checks
every neighbour's signature before sealing any share (``ProtocolAbort``). Not
covered: an actively malicious server that lies about dropouts to different
clients (that needs the consistency-check round and signatures of the full
protocol), a server that relays share-signing keys other than the advertised
ones to clients without identity keys (unsigned mode trusts the server to
relay), and inputs that are themselves wrong (no input validation).

Stages: setup -> advertise keys -> share keys -> masked input -> unmask.
Every message is checked (session, stage, sender, shapes); a refused message
raises ``ProtocolError`` and leaves the state unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from typing import Mapping

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsecmem.crypto import aead, shamir
from fedsecmem.crypto.agreement import KeyPair, agree, generate_keypair, hkdf, keypair_from_private
from fedsecmem.crypto.errors import CryptoError
from fedsecmem.crypto.prg import SEED_BYTES, add_masks, ring_dtype
from fedsecmem.protocols.errors import CheatingDetected, ProtocolAbort, ProtocolError
from fedsecmem.protocols.graph import connected, harary_graph
from fedsecmem.protocols.secagg_messages import (
    COMMITMENT_BYTES, PUBLIC_KEY_BYTES, SESSION_BYTES, SHARE_CIPHERTEXT_BYTES, SHARE_PLAINTEXT_BYTES, SIGNATURE_BYTES,
    SIGNED_SHARE_BYTES, AdvertiseKeys, EncryptedShares, MaskedInput, NeighbourKeys, Setup, SharesForYou, UnmaskRequest,
    UnmaskShares,
)

STAGES = ("advertise", "share", "mask", "unmask", "done")
MAX_CLIENT_ID = 2**31 - 1  # Shamir x-coordinate id + 1 travels in 4 bytes
_SHARE_INFO = b"fedsecmem/secagg/share-encryption"
_PAIR_INFO = b"fedsecmem/secagg/pairwise-mask"
_SELF_INFO = b"fedsecmem/secagg/self-mask"
_COMMIT_INFO = b"fedsecmem/secagg/self-seed-commitment"
_ADVERTISE_INFO = b"fedsecmem/secagg/advertised-keys"
_SHARE_SIGN_INFO = b"fedsecmem/secagg/share-signature"  # differs from _ADVERTISE_INFO at byte 17
_SECRETS = {"self": b"b", "key": b"s"}  # which secret a share is of: the self-mask seed b_u or the mask key
_WHAT = {"self": "self-mask seed", "key": "mask key"}


@dataclass(frozen=True)
class SecAggParams:
    session: bytes
    neighbours: dict[int, tuple[int, ...]]
    threshold: int
    length: int
    bits: int

    @property
    def clients(self) -> tuple[int, ...]:
        return tuple(sorted(self.neighbours))

    def holders(self, cid: int) -> tuple[int, ...]:
        """Who holds shares of ``cid``'s secrets: the client and its neighbours."""
        return tuple(sorted((cid, *self.neighbours[cid])))


def default_threshold(k: int) -> int:
    """Smallest majority of a neighbourhood of k + 1 (client and neighbours)."""
    return (k + 1) // 2 + 1


def make_params(clients: list[int], length: int, bits: int = 64, neighbours: int | None = None,
                threshold: int | None = None) -> SecAggParams:
    """A fresh instance: random session id, k-regular graph (complete when ``neighbours`` is None),
    threshold t (default: majority of each neighbourhood)."""
    n = len(clients)
    if n < 2:
        raise ValueError("secure aggregation needs at least 2 clients")
    if any(not 0 <= c < MAX_CLIENT_ID for c in clients):
        raise ValueError(f"client ids must be in [0, {MAX_CLIENT_ID})")
    k = n - 1 if neighbours is None else neighbours
    if k < min(2, n - 1):
        raise ValueError(f"neighbours k={k}: a graph of degree 1 splits into pairs whose sums would be revealed")
    t = default_threshold(k) if threshold is None else threshold
    if not (k + 1) / 2 < t <= k + 1:
        raise ValueError(f"threshold t={t} must be a majority of the {k + 1} share holders "
                         f"(between {(k + 1) // 2 + 1} and {k + 1})")
    ring_dtype(bits)
    return SecAggParams(os.urandom(SESSION_BYTES), harary_graph(clients, k), t, int(length), bits)


def _pair_seed(mine: KeyPair, peer_public: bytes, session: bytes, u: int, v: int) -> bytes:
    lo, hi = min(u, v), max(u, v)
    return agree(mine, peer_public, _PAIR_INFO + session + struct.pack(">QQ", lo, hi))


def _self_seed(b: bytes, session: bytes) -> bytes:
    return hkdf(b, _SELF_INFO + session)


def seed_commitment(b: bytes, session: bytes, cid: int) -> bytes:
    """SHA-256 commitment to a self-mask seed (hiding: b is 32 random bytes; binding: collision
    resistance), advertised before any share is sent."""
    return hashlib.sha256(_COMMIT_INFO + session + struct.pack(">Q", cid) + b).digest()


def advertised_bytes(session: bytes, cid: int, c_public: bytes, s_public: bytes, commitment: bytes,
                     share_key: bytes) -> bytes:
    """What a client signs when it advertises its keys (and its neighbours verify)."""
    return _ADVERTISE_INFO + session + struct.pack(">Q", cid) + c_public + s_public + commitment + share_key


def share_signed_bytes(session: bytes, dealer: int, holder: int, kind: str, share: bytes) -> bytes:
    """What ``dealer`` signs for each share it deals: ``kind`` ``"self"`` (self-mask seed) or ``"key"``
    (mask key) and the share's bytes, for ``holder`` in ``session`` (fixed length: unambiguous)."""
    return _SHARE_SIGN_INFO + session + struct.pack(">QQ", dealer, holder) + _SECRETS[kind] + share


def _public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


@dataclass(frozen=True)
class ShareEvidence:
    """A share as a holder returned it at unmasking, with the signature that came with it: proof
    against the holder when the signature fails under the dealer's advertised share key, against the
    dealer when t of them verify and do not give the secret it advertised."""

    session: bytes
    dealer: int
    holder: int
    kind: str  # "self" (self-mask seed) or "key" (mask key)
    share: bytes
    signature: bytes

    def signed_by(self, share_key: bytes) -> bool:
        """Whether the dealer's share key (32 bytes, as advertised) signed this share for this holder."""
        try:
            Ed25519PublicKey.from_public_bytes(share_key).verify(
                self.signature, share_signed_bytes(self.session, self.dealer, self.holder, self.kind, self.share))
            return True
        except (InvalidSignature, ValueError):
            return False


def _sign(u: int, v: int) -> int:
    """u adds +PRG(s_uv) when u < v and -PRG(s_uv) otherwise, so each pair cancels."""
    return 1 if u < v else -1


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ProtocolError(msg)


class SecAggClient:
    """One client of one SecAgg+ instance (one vector summed)."""

    def __init__(self, cid: int, setup: Setup, signer: Ed25519PrivateKey | None = None,
                 verify_keys: Mapping[int, Ed25519PublicKey] | None = None):
        """``signer``: this client's Ed25519 key, signing its advertised keys; ``verify_keys``: every
        client's public signing key, to check its neighbours' advertisements (None: unsigned mode)."""
        _check(setup.receiver == cid, f"client {cid}: setup addressed to client {setup.receiver}")
        self.cid = cid
        self.setup = setup
        self.signer, self.verify_keys = signer, verify_keys
        # signs the shares this client deals: its identity key when provisioned, else a key of this instance
        self.share_signer = signer if signer is not None else Ed25519PrivateKey.generate()
        self.stage = "advertise"
        self.c_keys = generate_keypair()
        self.s_keys = generate_keypair()
        self.self_seed_b = os.urandom(SEED_BYTES)
        self.peer_keys: dict[int, tuple[bytes, bytes]] = {}
        self.peer_share_keys: dict[int, Ed25519PublicKey] = {}
        # owner -> its (b share, key share), each followed by the owner's signature (SIGNED_SHARE_BYTES)
        self.held: dict[int, tuple[bytes, bytes]] = {}
        self.masked_with: set[int] = set()

    def _enter(self, stage: str, session: bytes, receiver: int | None = None) -> None:
        _check(session == self.setup.session, f"client {self.cid}: message from another session (replay?)")
        _check(receiver is None or receiver == self.cid, f"client {self.cid}: message for client {receiver}")
        _check(self.stage == stage, f"client {self.cid}: got a {stage} message in stage {self.stage}")

    def advertise(self) -> AdvertiseKeys:
        self._enter("advertise", self.setup.session)
        self.stage = "share"
        commitment = seed_commitment(self.self_seed_b, self.setup.session, self.cid)
        share_key = _public_bytes(self.share_signer)
        signature = b"" if self.signer is None else self.signer.sign(advertised_bytes(
            self.setup.session, self.cid, self.c_keys.public, self.s_keys.public, commitment, share_key))
        return AdvertiseKeys(self.setup.session, self.cid, self.c_keys.public, self.s_keys.public, commitment,
                             signature, share_key)

    def _check_signed(self, msg: NeighbourKeys) -> None:
        """Every neighbour's keys are the ones it signed: a server that substitutes a key (to read the
        shares sent to that neighbour, or to pass off shares as that neighbour's) is refused before any
        share is made."""
        if self.verify_keys is None:
            return
        for v, (c_public, s_public) in sorted(msg.keys.items()):
            proof = msg.proofs.get(v, b"")
            key = self.verify_keys.get(v)
            try:
                if key is None or len(proof) != COMMITMENT_BYTES + SIGNATURE_BYTES:
                    raise InvalidSignature
                key.verify(proof[COMMITMENT_BYTES:], advertised_bytes(
                    msg.session, v, c_public, s_public, proof[:COMMITMENT_BYTES], msg.share_keys.get(v, b"")))
            except InvalidSignature:
                raise ProtocolAbort(f"client {self.cid}: the keys relayed for client {v} are not the ones it "
                                    "signed (substituted?); refusing to share") from None

    def share_keys(self, msg: NeighbourKeys) -> EncryptedShares:
        self._enter("share", msg.session, msg.receiver)
        t = self.setup.threshold
        unknown = set(msg.keys) - set(self.setup.neighbours)
        _check(not unknown, f"client {self.cid}: keys of non-neighbours {sorted(unknown)}")
        _check(set(msg.share_keys) == set(msg.keys), f"client {self.cid}: share keys and keys name different clients")
        try:
            share_keys = {v: Ed25519PublicKey.from_public_bytes(k) for v, k in msg.share_keys.items()}
        except ValueError:
            raise ProtocolError(f"client {self.cid}: a share key is not {PUBLIC_KEY_BYTES} bytes") from None
        self._check_signed(msg)
        if len(msg.keys) + 1 < t:
            raise ProtocolAbort(f"client {self.cid}: only {len(msg.keys)} neighbours advertised keys, "
                                f"threshold {t} cannot be met")
        self.peer_keys = dict(msg.keys)
        self.peer_share_keys = share_keys
        holders = sorted([self.cid, *msg.keys])
        xs = [h + 1 for h in holders]
        b_shares = shamir.split(self.self_seed_b, xs, t)
        s_shares = shamir.split(self.s_keys.private_bytes(), xs, t)
        out = {}
        for h, bs, ss in zip(holders, b_shares, s_shares):
            b_signed, s_signed = self._signed(h, "self", bs), self._signed(h, "key", ss)
            if h == self.cid:
                self.held[self.cid] = (b_signed, s_signed)
                continue
            try:
                key = agree(self.c_keys, msg.keys[h][0], _SHARE_INFO + self.setup.session)
            except CryptoError as exc:
                raise ProtocolError(f"client {self.cid}: key of client {h}: {exc}") from None
            plain = struct.pack(">QQ", self.cid, h) + b_signed + s_signed
            out[h] = aead.seal(key, plain, aead.associated_data(self.cid, h, self.setup.session, "share"))
        self.stage = "mask"
        return EncryptedShares(self.setup.session, self.cid, out)

    def _signed(self, holder: int, kind: str, share: shamir.Share) -> bytes:
        """``share`` (of ``kind``) as dealt to ``holder``: its bytes, then this client's signature of them."""
        raw = share.to_bytes()
        return raw + self.share_signer.sign(share_signed_bytes(self.setup.session, self.cid, holder, kind, raw))

    def mask(self, msg: SharesForYou, x: np.ndarray) -> MaskedInput:
        """Mask ``x`` (ring elements of the instance's width) against the neighbours that shared."""
        self._enter("mask", msg.session, msg.receiver)
        dtype = ring_dtype(self.setup.bits)
        x = np.asarray(x)
        _check(x.dtype == dtype and x.shape == (self.setup.length,),
               f"client {self.cid}: input must be {self.setup.length} {dtype} values")
        _check(set(msg.ciphertexts) <= set(self.peer_keys),
               f"client {self.cid}: shares from clients that advertised no keys")
        if len(msg.ciphertexts) + 1 < self.setup.threshold:
            raise ProtocolAbort(f"client {self.cid}: only {len(msg.ciphertexts)} neighbours shared keys, "
                                f"threshold {self.setup.threshold} cannot be met")
        held = {}
        for v, blob in msg.ciphertexts.items():
            try:
                key = agree(self.c_keys, self.peer_keys[v][0], _SHARE_INFO + self.setup.session)
                plain = aead.open_sealed(key, blob, aead.associated_data(v, self.cid, self.setup.session, "share"))
            except CryptoError as exc:
                raise ProtocolError(f"client {self.cid}: share from client {v}: {exc}") from None
            _check(len(plain) == SHARE_PLAINTEXT_BYTES and struct.unpack(">QQ", plain[:16]) == (v, self.cid),
                   f"client {self.cid}: malformed share from client {v}")
            held[v] = (plain[16 : 16 + SIGNED_SHARE_BYTES], plain[16 + SIGNED_SHARE_BYTES :])
            for kind, signed in zip(("self", "key"), held[v]):
                self._check_dealt(v, kind, signed)
        self.held.update(held)
        self.masked_with = set(msg.ciphertexts)
        seeds = [_self_seed(self.self_seed_b, self.setup.session)]
        signs = [1]
        for v in sorted(self.masked_with):
            seeds.append(_pair_seed(self.s_keys, self.peer_keys[v][1], self.setup.session, self.cid, v))
            signs.append(_sign(self.cid, v))
        y = add_masks(x.copy(), seeds, signs)
        self.stage = "unmask"
        return MaskedInput(self.setup.session, self.cid, y)

    def _check_dealt(self, dealer: int, kind: str, signed: bytes) -> None:
        """A share ``dealer`` sealed for this client is at this client's point and signed by the dealer's
        advertised share key for this client: else it is refused (returned, the server would blame it
        on this client)."""
        n = shamir.SHARE_BYTES
        try:
            share = shamir.Share.from_bytes(signed[:n])
        except CryptoError as exc:
            raise ProtocolError(f"client {self.cid}: share from client {dealer}: {exc}") from None
        _check(share.x == self.cid + 1, f"client {self.cid}: client {dealer} dealt it a share at point {share.x}, "
                                        f"not {self.cid + 1}; refusing")
        try:
            self.peer_share_keys[dealer].verify(
                signed[n:], share_signed_bytes(self.setup.session, dealer, self.cid, kind, signed[:n]))
        except InvalidSignature:
            raise ProtocolError(f"client {self.cid}: a share of client {dealer}'s {_WHAT[kind]} is not signed by "
                                f"client {dealer}'s advertised key; refusing") from None

    def unmask(self, msg: UnmaskRequest) -> UnmaskShares:
        """Reveal, per neighbour, the self-mask share if it survived or the key share if it dropped."""
        self._enter("unmask", msg.session, msg.receiver)
        alive, dropped = set(msg.survivors), set(msg.dropped)
        _check(not alive & dropped, f"client {self.cid}: a client is listed both alive and dropped; refusing")
        _check(self.cid in alive, f"client {self.cid}: listed as not alive; refusing")
        _check(dropped <= self.masked_with, f"client {self.cid}: dropped clients that never shared with me")
        if len(alive) < self.setup.threshold:
            raise ProtocolAbort(f"client {self.cid}: only {len(alive)} masked inputs, threshold "
                                f"{self.setup.threshold}; refusing to unmask")
        if self.setup.sparse and len(alive - {self.cid}) < self.setup.threshold:
            # on a sparse graph t - 1 colluders could be all of this client's live neighbours, and the
            # dropped ones' keys would strip its last pairwise masks: its input would stand alone
            raise ProtocolAbort(f"client {self.cid}: only {len(alive - {self.cid})} live neighbours of "
                                f"{len(self.setup.neighbours)}, t - 1 = {self.setup.threshold - 1} colluders could be "
                                "all of them; refusing to unmask")
        b = {v: self.held[v][0] for v in sorted(alive) if v in self.held}
        s = {v: self.held[v][1] for v in sorted(dropped) if v in self.held}
        self.stage = "done"
        return UnmaskShares(self.setup.session, self.cid, b, s)


class SecAggServer:
    """The aggregator of one SecAgg+ instance: routes messages and recovers only the sum.

    Feed each stage's messages to ``receive`` as they arrive, then call ``close_stage``
    (when all expected arrived or the stage's deadline passed): it returns what to send next.
    """

    def __init__(self, params: SecAggParams, min_inputs: int = 1):
        """``min_inputs``: unmask only a sum of at least this many inputs (never fewer than t), e.g.
        the survivors distributed DP noise counts on."""
        self.params = params
        self.min_inputs = max(params.threshold, min_inputs)
        self.stage = "advertise"
        self.inbox: dict[int, object] = {}
        self.keys: dict[int, AdvertiseKeys] = {}
        self.shares: dict[int, EncryptedShares] = {}
        self.masked: dict[int, MaskedInput] = {}
        self.rejected = 0
        self.cheaters: dict[int, str] = {}  # client -> what it was proved to do (forge a share, deal bad ones)
        self.evidence: dict[int, tuple[ShareEvidence, ...]] = {}  # client -> the shares that prove it
        self._probe = generate_keypair()  # checks advertised keys are usable

    def setups(self) -> dict[int, Setup]:
        p = self.params
        return {c: Setup(p.session, c, p.neighbours[c], p.threshold, p.length, p.bits, len(p.clients))
                for c in p.clients}

    def _senders(self):
        """Who may send in the current stage (a container, looked up in O(1): the work per message
        stays O(k), so a stage costs the server n k, not n^2)."""
        return {"advertise": self.params.neighbours, "share": self.keys, "mask": self.shares,
                "unmask": self.masked}.get(self.stage, {})

    @property
    def expected(self) -> set[int]:
        """Who may still send in the current stage."""
        return set(self._senders())

    _TYPES = {"advertise": AdvertiseKeys, "share": EncryptedShares, "mask": MaskedInput, "unmask": UnmaskShares}

    def receive(self, msg) -> None:
        """Validate and keep one message; raises ``ProtocolError`` (state unchanged) if refused."""
        try:
            self._validate(msg)
        except ProtocolError:
            self.rejected += 1
            raise
        self.inbox[msg.sender] = msg

    def _validate(self, msg) -> None:
        p = self.params
        want = self._TYPES.get(self.stage)
        _check(want is not None and isinstance(msg, want),
               f"server: {type(msg).__name__} refused in stage {self.stage}")
        _check(msg.session == p.session, f"server: message from client {msg.sender} for another session (replay?)")
        _check(msg.sender in self._senders(), f"server: client {msg.sender} is not expected in stage {self.stage}")
        _check(msg.sender not in self.inbox, f"server: duplicate {self.stage} message from client {msg.sender}")
        if isinstance(msg, AdvertiseKeys):
            keys = (msg.c_public, msg.s_public)
            _check(all(isinstance(k, bytes) and len(k) == 32 for k in keys), "server: public keys must be 32 bytes")
            _check(msg.c_public != msg.s_public, "server: the two public keys must differ")
            for key in keys:  # a low-order point would make every neighbour's key agreement fail
                try:
                    agree(self._probe, key, b"fedsecmem/secagg/key-check")
                except CryptoError:
                    raise ProtocolError(f"server: client {msg.sender} advertised an invalid public key") from None
            _check(isinstance(msg.share_key, bytes) and len(msg.share_key) == PUBLIC_KEY_BYTES,
                   f"server: client {msg.sender} must advertise a {PUBLIC_KEY_BYTES}-byte share-signing key")
        elif isinstance(msg, EncryptedShares):
            want = {v for v in p.neighbours[msg.sender] if v in self.keys}
            _check(set(msg.ciphertexts) == want,
                   f"server: client {msg.sender} must address shares to exactly its neighbours {sorted(want)}")
            _check(all(isinstance(c, bytes) and len(c) == SHARE_CIPHERTEXT_BYTES for c in msg.ciphertexts.values()),
                   f"server: share ciphertexts of client {msg.sender} must be {SHARE_CIPHERTEXT_BYTES} bytes")
        elif isinstance(msg, MaskedInput):
            v = msg.vector
            _check(isinstance(v, np.ndarray) and v.dtype == ring_dtype(p.bits) and v.shape == (p.length,),
                   f"server: masked input of client {msg.sender} must be {p.length} {ring_dtype(p.bits)} values")
        elif isinstance(msg, UnmaskShares):
            holders_of = set(msg.self_mask_shares) | set(msg.key_shares)
            _check(all(o in self.shares for o in holders_of), f"server: client {msg.sender} sent shares of unknown clients")
            _check(not set(msg.self_mask_shares) & set(msg.key_shares),
                   f"server: client {msg.sender} sent both shares for one client")
            for owner, blob in [*msg.self_mask_shares.items(), *msg.key_shares.items()]:
                _check(msg.sender in p.holders(owner), f"server: client {msg.sender} holds no share of client {owner}")
                _check(isinstance(blob, bytes) and len(blob) == SIGNED_SHARE_BYTES,
                       f"server: a share from client {msg.sender} is {SIGNED_SHARE_BYTES} bytes with its signature")
                try:
                    share = shamir.Share.from_bytes(blob[: shamir.SHARE_BYTES])
                except CryptoError:
                    raise ProtocolError(f"server: malformed share from client {msg.sender}") from None
                _check(share.x == msg.sender + 1, f"server: client {msg.sender} sent a share at the wrong point")

    def _need(self, have: int, what: str, need: int | None = None) -> None:
        need = self.params.threshold if need is None else need
        if have < need:
            self.stage = "aborted"
            raise ProtocolAbort(f"secagg: only {have} clients {what}, at least {need} needed; "
                                "round aborted, nothing revealed")

    def close_stage(self):
        """Finish the current stage with the messages received; return the next stage's messages
        (dict receiver -> message), or the unmasked sum (ring vector) after the last stage."""
        inbox, self.inbox = self.inbox, {}
        stage = self.stage
        if stage == "advertise":
            self.keys = inbox
            self._need(len(self.keys), "advertised keys")
            self.stage = "share"
            return {u: NeighbourKeys(self.params.session, u,
                                     {v: (self.keys[v].c_public, self.keys[v].s_public)
                                      for v in self.params.neighbours[u] if v in self.keys},
                                     {v: self.keys[v].b_commitment + self.keys[v].signature
                                      for v in self.params.neighbours[u] if v in self.keys},
                                     {v: self.keys[v].share_key for v in self.params.neighbours[u] if v in self.keys})
                    for u in self.keys}
        if stage == "share":
            self.shares = inbox
            self._need(len(self.shares), "shared keys")
            self.stage = "mask"
            relayed: dict[int, dict[int, bytes]] = {v: {} for v in self.shares}  # one pass: n k, not n^2
            for u, m in self.shares.items():
                for v, ciphertext in m.ciphertexts.items():
                    if v in relayed:
                        relayed[v][u] = ciphertext
            return {v: SharesForYou(self.params.session, v, relayed[v]) for v in self.shares}
        if stage == "mask":
            self.masked = inbox
            self._need(len(self.masked), "sent masked inputs", self.min_inputs)
            if not connected(set(self.masked), self.params.neighbours):
                self.stage = "aborted"
                raise ProtocolAbort("secagg: the survivors' neighbour graph is disconnected (too many dropouts "
                                    "for k neighbours); unmasking would reveal partial sums, round aborted")
            self.stage = "unmask"
            alive = set(self.masked)
            dropped = set(self.shares) - alive
            return {u: UnmaskRequest(self.params.session, u,  # each client's k neighbours, not all n
                                     tuple(v for v in self.params.holders(u) if v in alive),
                                     tuple(sorted(v for v in self.params.neighbours[u] if v in dropped)))
                    for u in sorted(alive)}
        if stage == "unmask":
            self._need(len(inbox), "returned shares")
            total = self._unmask(inbox)
            self.stage = "done"
            return total
        raise ProtocolError(f"server: nothing to close in stage {stage}")

    def _reconstruct(self, owner: int, replies: dict[int, UnmaskShares], kind: str) -> bytes:
        """``owner``'s self-mask seed (``kind="self"``) or mask key from the returned shares, checked
        against what ``owner`` advertised (the seed's commitment, the key's public half).

        The first t shares are combined; when that is not what ``owner`` advertised, every returned
        share's signature is checked against ``owner``'s advertised share key: a share that fails names
        its sender (``cheaters``, ``evidence``) and t shares that pass give the secret. Raises
        ``CheatingDetected`` when t shares ``owner`` signed do not give what it advertised (it dealt
        them so: it is named, nobody else for this secret), or when too few validly signed shares are
        left (the forgers are named); ``ProtocolAbort`` when fewer than t shares came back at all."""
        t, session, what = self.params.threshold, self.params.session, _WHAT[kind]
        n = shamir.SHARE_BYTES
        returned: list[tuple[int, bytes]] = []
        for sender in self.params.holders(owner):  # in order; only they hold its shares (checked on receipt)
            r = replies.get(sender)
            blob = None if r is None else (r.self_mask_shares if kind == "self" else r.key_shares).get(owner)
            if blob is not None:
                returned.append((sender, blob))
        if len(returned) < t:
            self.stage = "aborted"
            raise ProtocolAbort(f"secagg: client {owner}'s {what} has {len(returned)} shares back, "
                                f"threshold {t}; round aborted, nothing revealed")

        def advertised(shares: list[bytes]) -> bytes | None:
            """The secret of the first t ``shares`` if it is what the owner advertised, else None."""
            try:
                secret = shamir.combine([shamir.Share.from_bytes(b[:n]) for b in shares[:t]], t)
            except CryptoError:  # not even a 32-byte secret
                return None
            if kind == "self":
                ok = hmac.compare_digest(seed_commitment(secret, session, owner), self.keys[owner].b_commitment)
            else:
                ok = keypair_from_private(secret).public == self.keys[owner].s_public
            return secret if ok else None

        secret = advertised([blob for _, blob in returned])
        if secret is not None:  # what the owner committed to: right, whoever signed what
            return secret
        share_key = self.keys[owner].share_key
        proofs = [ShareEvidence(session, owner, sender, kind, blob[:n], blob[n:]) for sender, blob in returned]
        valid, forged = [], []
        for proof in proofs:
            if proof.signed_by(share_key):
                valid.append(proof)
            else:  # the holder returned a share its dealer never signed for it
                forged.append(proof.holder)
                self.cheaters[proof.holder] = (f"returned a share of client {owner}'s {what} that client {owner} "
                                               "did not sign")
                self.evidence[proof.holder] = (*self.evidence.get(proof.holder, ()), proof)
        if len(valid) >= t:
            secret = advertised([p.share for p in valid])
            if secret is not None:
                return secret
            self.stage = "aborted"
            self.cheaters[owner] = f"dealt shares of a {what} other than the one it advertised"
            self.evidence[owner] = tuple(valid[:t])
            raise CheatingDetected(f"secagg: client {owner} dealt shares of a {what} other than the one it "
                                   f"advertised ({t} of them carry its signature); round aborted, nothing revealed",
                                   set(self.cheaters))
        self.stage = "aborted"
        raise CheatingDetected(f"secagg: client {owner}'s {what}: clients {forged} returned shares client {owner} "
                               f"did not sign, {len(valid)} validly signed left, threshold {t}; round aborted, "
                               "nothing revealed", set(self.cheaters))

    def _unmask(self, replies: dict[int, UnmaskShares]) -> np.ndarray:
        p = self.params
        total = np.zeros(p.length, dtype=ring_dtype(p.bits))
        for m in self.masked.values():
            total += m.vector
        seeds, signs = [], []
        for v in sorted(self.masked):
            seeds.append(_self_seed(self._reconstruct(v, replies, "self"), p.session))
            signs.append(-1)
        for v in sorted(set(self.shares) - set(self.masked)):
            s_key = keypair_from_private(self._reconstruct(v, replies, "key"))  # checked against s_public
            for u in p.neighbours[v]:
                if u in self.masked:  # u masked with v because v shared keys
                    seeds.append(_pair_seed(s_key, self.keys[u].s_public, p.session, u, v))
                    signs.append(-_sign(u, v))
        return add_masks(total, seeds, signs)
