"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret s < 2^256 is the constant term of a random polynomial of degree
t - 1 whose other coefficients are drawn with ``secrets``; share i is
(x_i, f(x_i)) with distinct non-zero x_i. Any t shares give s by Lagrange
interpolation at 0; any t - 1 shares are jointly uniform, so they say nothing
about s. A share corrupted at random makes the reconstruction a random field
element, >= 2^256 but with probability 2^-265, which is reported instead of
returning a wrong secret; integrity against deliberate forgery is the job of
the authenticated channel that carries shares (AES-GCM), not of this module.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Sequence

from fedsecmem.crypto.errors import CryptoError

PRIME = (1 << 521) - 1  # a Mersenne prime: field elements fit 66 bytes
SECRET_BYTES = 32
ELEMENT_BYTES = 66


@dataclass(frozen=True)
class Share:
    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(4, "big") + self.y.to_bytes(ELEMENT_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Share":
        if len(data) != 4 + ELEMENT_BYTES:
            raise CryptoError(f"a share is {4 + ELEMENT_BYTES} bytes, got {len(data)}")
        share = cls(int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big"))
        if not 0 < share.x < PRIME or not 0 <= share.y < PRIME:
            raise CryptoError("share out of field range")
        return share


SHARE_BYTES = 4 + ELEMENT_BYTES


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    y = 0
    for c in reversed(coefficients):  # Horner
        y = (y * x + c) % PRIME
    return y


def split(secret: bytes, xs: Sequence[int], threshold: int,
          coefficients: Sequence[int] | None = None) -> list[Share]:
    """Shares of ``secret`` at the points ``xs`` (distinct, >= 1) with reconstruction threshold
    ``threshold``. ``coefficients`` (degree 1..t-1) are for known-answer tests only."""
    if len(secret) != SECRET_BYTES:
        raise CryptoError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise CryptoError(f"threshold {threshold} must be between 1 and the {len(xs)} share holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise CryptoError("share points must be distinct and non-zero")
    if coefficients is None:
        coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    elif len(coefficients) != threshold - 1:
        raise CryptoError("need exactly threshold - 1 coefficients")
    poly = [int.from_bytes(secret, "big"), *coefficients]
    return [Share(x, _evaluate(poly, x)) for x in xs]


def _inverses(values: Sequence[int]) -> list[int]:
    """1 / v mod PRIME for every (non-zero) v, with one modular exponentiation (Montgomery's trick:
    invert the product, then peel it back with the prefix products)."""
    prefix, acc = [], 1
    for v in values:
        prefix.append(acc)
        acc = acc * v % PRIME
    inv = pow(acc, -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


def interpolate(shares: Sequence[Share], x: int) -> int:
    """f(x) of the polynomial of degree len(shares) - 1 through ``shares`` (Lagrange): the weights'
    numerators from prefix and suffix products of (x - x_j), their denominators inverted at once
    (the server reconstructs a seed per client and sum, so this is its main cost)."""
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise CryptoError("duplicate share points")
    t = len(xs)
    diffs = [(x - xj) % PRIME for xj in xs]
    before, after = [1] * (t + 1), [1] * (t + 1)  # products of diffs[:i] and diffs[i:]
    for i in range(t):
        before[i + 1] = before[i] * diffs[i] % PRIME
        after[t - 1 - i] = after[t - i] * diffs[t - 1 - i] % PRIME
    # the x_j are small integers: each product is exact before its one reduction
    dens = [math.prod(xi - xj for xj in xs if xj != xi) % PRIME for xi in xs]
    y = 0
    for i, (si, inv) in enumerate(zip(shares, _inverses(dens))):
        y = (y + si.y * (before[i] * after[i + 1] % PRIME) * inv) % PRIME
    return y


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (the first ``threshold`` are used)."""
    if threshold < 1:
        raise CryptoError("threshold must be at least 1")
    if len(shares) < threshold:
        raise CryptoError(f"{len(shares)} shares given, {threshold} needed")
    secret = interpolate(list(shares)[:threshold], 0)
    if secret >= 1 << (8 * SECRET_BYTES):
        raise CryptoError("shares are inconsistent (reconstruction is not a 32-byte secret)")
    return secret.to_bytes(SECRET_BYTES, "big")
