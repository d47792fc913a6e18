"""Fixed-point encoding of real vectors into the ring Z_(2^bits) used by masked sums.

x is encoded as round(x * 2^frac_bits) in two's complement modulo 2^bits.
The sum of ``parties`` encodings decodes correctly as long as it stays in
(-2^(bits-1), 2^(bits-1)); ``bound`` is the largest |x| per party for which
that holds, and ``encode`` refuses anything larger *before* it is masked, so
an overflow can never silently wrap the modular sum. The bound also keeps
|x * 2^frac_bits| <= 2^52, where float64 still represents every integer.

Rounding is to nearest (error <= 2^-(frac_bits+1) per element and party) or
stochastic (unbiased; the coin flips come from the cryptographic PRG, error
< 2^-frac_bits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedsecmem.crypto.errors import OverflowRisk
from fedsecmem.crypto.prg import SEED_BYTES, expand, ring_dtype

_SIGNED = {32: np.int32, 64: np.int64}


@dataclass(frozen=True)
class FixedPoint:
    bits: int = 64
    frac_bits: int = 24
    parties: int = 1

    def __post_init__(self) -> None:
        ring_dtype(self.bits)
        if not 0 <= self.frac_bits < self.bits - 1:
            raise ValueError(f"frac_bits must be in [0, {self.bits - 2}], got {self.frac_bits}")
        if self.parties < 1:
            raise ValueError("parties must be >= 1")
        if self.bound <= 0:
            raise ValueError(f"{self.parties} parties leave no room in a {self.bits}-bit ring "
                             f"at 2^{self.frac_bits} scale")

    @property
    def scale(self) -> float:
        return float(2**self.frac_bits)

    @property
    def bound(self) -> float:
        """Largest |x| a party may encode so that the sum of all parties cannot wrap
        (one unit of rounding per party included)."""
        room = (2 ** (self.bits - 1) - 1) // self.parties - 1
        # x * scale must also be exact in float64 (|x * scale| <= 2^52) for the rounding bound to hold
        return min(room, 2**52) / self.scale

    def sum_error(self, rounding: str = "nearest") -> float:
        """Worst-case absolute error per element of a decoded sum over all parties."""
        return self.parties * (0.5 if rounding == "nearest" else 1.0) / self.scale

    def encode(self, x: np.ndarray, rounding: Literal["nearest", "stochastic"] = "nearest") -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)):
            raise OverflowRisk("fixed point: input has NaN or infinite values")
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > self.bound:
            raise OverflowRisk(
                f"fixed point: |value| {peak:.6g} exceeds the bound {self.bound:.6g} for "
                f"{self.parties} parties in a {self.bits}-bit ring at scale 2^{self.frac_bits}; "
                f"the sum could wrap (use more bits or fewer fractional bits)")
        scaled = x * self.scale
        if rounding == "nearest":
            q = np.rint(scaled)
        elif rounding == "stochastic":
            low = np.floor(scaled)
            # 53 random bits per coin: exactly representable, uniform on [0, 1)
            coins = (expand(os.urandom(SEED_BYTES), x.size, 64) >> np.uint64(11)).astype(np.float64) * 2.0**-53
            q = low + (coins < scaled - low)
        else:
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        q = q.astype(np.int64)
        if self.bits == 64:
            return q.view(np.uint64).copy()
        return (q & 0xFFFFFFFF).astype(np.uint32)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """Signed real values from a ring element (an encoding or a sum of encodings)."""
        total = np.asarray(total)
        if total.dtype != ring_dtype(self.bits):
            raise ValueError(f"decode expects {ring_dtype(self.bits)}, got {total.dtype}")
        return total.view(_SIGNED[self.bits]).astype(np.float64) / self.scale
