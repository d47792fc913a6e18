"""Cryptographic PRG: a 32-byte seed expanded to a vector over Z_(2^32) or Z_(2^64).

The keystream of AES-256-CTR (key = seed, counter from zero) is read as
little-endian unsigned integers, so every element is uniform on the ring.
A seed must key exactly one stream: callers derive a fresh seed per use with
HKDF (see ``agreement.hkdf``), which is why a fixed initial counter is safe.

``add_masks`` expands several seeds and adds/subtracts them into a vector
block by block: the block stays in the CPU cache while all keystreams are
folded into it, so masking costs little more than producing the keystreams.
No per-element Python, no numpy RNG.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedsecmem.crypto.errors import CryptoError

SEED_BYTES = 32
BLOCK_ELEMENTS = 1 << 15  # elements per cache-resident block (128-256 KB)
_ZERO_IV = bytes(16)
RING_DTYPES = {32: np.uint32, 64: np.uint64}


def ring_dtype(bits: int) -> np.dtype:
    if bits not in RING_DTYPES:
        raise ValueError(f"ring bits must be 32 or 64, got {bits}")
    return np.dtype(RING_DTYPES[bits])


def _stream(seed: bytes):
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise CryptoError(f"PRG seed must be {SEED_BYTES} bytes")
    return Cipher(algorithms.AES(bytes(seed)), modes.CTR(_ZERO_IV)).encryptor()


def expand(seed: bytes, n: int, bits: int = 32) -> np.ndarray:
    """``n`` uniform elements of Z_(2^bits) from ``seed``."""
    dtype = ring_dtype(bits)
    return np.frombuffer(_stream(seed).update(bytes(n * dtype.itemsize)), dtype=dtype).copy()


def add_masks(vector: np.ndarray, seeds: Sequence[bytes], signs: Sequence[int]) -> np.ndarray:
    """``vector + sum_i signs[i] * expand(seeds[i])`` in the ring of ``vector``'s dtype (in place,
    returned). ``signs`` are +1 or -1."""
    if vector.dtype not in (np.uint32, np.uint64) or vector.ndim != 1:
        raise ValueError("add_masks: vector must be a 1-D uint32 or uint64 array")
    if len(seeds) != len(signs) or any(s not in (1, -1) for s in signs):
        raise ValueError("add_masks: one sign (+1 or -1) per seed")
    streams = [_stream(s) for s in seeds]
    width = vector.dtype.itemsize
    block = min(BLOCK_ELEMENTS, max(1, len(vector)))
    zeros = bytes(block * width)
    buf = bytearray(block * width + 15)  # update_into needs block-size headroom
    key = np.frombuffer(buf, dtype=vector.dtype, count=block)
    for start in range(0, len(vector), block):
        out = vector[start : start + block]
        m = len(out)
        for stream, sign in zip(streams, signs):
            stream.update_into(zeros[: m * width], buf)
            (np.add if sign > 0 else np.subtract)(out, key[:m], out=out)
    return vector
