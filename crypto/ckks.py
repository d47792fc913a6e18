"""CKKS homomorphic encryption for sums, on TenSEAL (Microsoft SEAL underneath).

A key authority makes the context. Clients receive the full context (with the
secret key) over a private channel; the aggregator receives only the public
context: no secret key, no Galois keys and no relinearization keys, because
adding ciphertexts needs none of them. Long vectors are cut into chunks of
``poly_modulus_degree / 2`` slots, one ciphertext each.

Parameters: SEAL refuses any (poly_modulus_degree, coeff_mod_bit_sizes) pair
below 128-bit security. The default N = 8192 with two 60-bit primes keeps one
data level (sums need no rescaling) and a 40-bit scale (tests assert sums
within 1e-5), and a decoded sum must stay below 2^(60 - 2 - 40) = 2^18 in
magnitude (one bit of margin below the modulus' half), which ``CkksParams.bound`` turns into a per-party input bound that
``encrypt`` enforces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tenseal as ts

from fedsecmem.crypto.errors import CryptoError, OverflowRisk


@dataclass(frozen=True)
class CkksParams:
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = field(default=(60, 60))
    scale_bits: int = 40

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def bound(self, parties: int) -> float:
        """Largest |x| per party such that the sum of ``parties`` inputs decrypts correctly."""
        data_bits = self.coeff_mod_bit_sizes[0]
        return 2.0 ** (data_bits - 2 - self.scale_bits) / parties


def _context(params: CkksParams) -> ts.Context:
    try:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    except ValueError as exc:
        raise CryptoError(f"CKKS parameters rejected by SEAL: {exc}") from None
    ctx.global_scale = 2.0**params.scale_bits
    return ctx


class KeyAuthority:
    """Makes one CKKS key set and hands out the secret context (clients) and public context (server)."""

    def __init__(self, params: CkksParams = CkksParams()):
        self.params = params
        self._ctx = _context(params)

    def secret_context(self) -> bytes:
        return self._ctx.serialize(save_public_key=True, save_secret_key=True,
                                   save_galois_keys=False, save_relin_keys=False)

    def public_context(self) -> bytes:
        return self._ctx.serialize(save_public_key=True, save_secret_key=False,
                                   save_galois_keys=False, save_relin_keys=False)


def load_context(data: bytes) -> ts.Context:
    try:
        return ts.context_from(data)
    except Exception as exc:  # TenSEAL raises bare exceptions on malformed input
        raise CryptoError(f"not a TenSEAL context: {exc}") from None


def encrypt(ctx: ts.Context, vector: np.ndarray, params: CkksParams, parties: int) -> list[bytes]:
    """Serialized ciphertexts of ``vector`` cut into ``params.slots``-long chunks."""
    x = np.asarray(vector, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise OverflowRisk("CKKS: input has NaN or infinite values")
    bound = params.bound(parties)
    if x.size and float(np.abs(x).max()) > bound:
        raise OverflowRisk(f"CKKS: |value| {float(np.abs(x).max()):.6g} exceeds the bound {bound:.6g} "
                           f"for {parties} parties at scale 2^{params.scale_bits}")
    return [ts.ckks_vector(ctx, x[s : s + params.slots]).serialize() for s in range(0, max(1, x.size), params.slots)]


def _load(ctx: ts.Context, blob: bytes) -> ts.CKKSVector:
    try:
        return ts.ckks_vector_from(ctx, blob)
    except Exception as exc:
        raise CryptoError(f"not a CKKS ciphertext for this context: {exc}") from None


def add(ctx: ts.Context, inputs: list[list[bytes]]) -> list[bytes]:
    """Chunk-wise sum of several parties' ciphertext lists (needs only the public context)."""
    if not inputs:
        raise CryptoError("nothing to add")
    if len({len(c) for c in inputs}) != 1:
        raise CryptoError("parties sent different numbers of ciphertext chunks")
    out = []
    for chunks in zip(*inputs):
        total = _load(ctx, chunks[0])
        for blob in chunks[1:]:
            total = total + _load(ctx, blob)  # `a + b`: SEAL's in-place add through TenSEAL is slower
        out.append(total.serialize())
    return out


def decrypt(ctx: ts.Context, chunks: list[bytes], length: int) -> np.ndarray:
    """The plaintext vector (first ``length`` values); needs the secret context."""
    if not ctx.is_private():
        raise CryptoError("decryption needs the secret context; this one is public")
    values = np.concatenate([np.asarray(_load(ctx, c).decrypt(), dtype=np.float64) for c in chunks])
    if len(values) < length:
        raise CryptoError(f"ciphertexts hold {len(values)} values, {length} expected")
    return values[:length]
