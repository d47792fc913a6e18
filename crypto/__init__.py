"""Cryptographic primitives (key agreement, KDF, AEAD, PRG masks, Shamir, fixed point, CKKS).

Lowest layer: imports nothing from the rest of fedsecmem.
"""
