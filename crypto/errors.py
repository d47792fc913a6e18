"""Errors raised by the cryptographic layer (no dependency on the pipeline)."""


class CryptoError(Exception):
    """A cryptographic check failed: wrong key, tampered data, inconsistent shares."""


class OverflowRisk(ValueError):
    """A value is outside the range that the fixed-point ring can sum without wrapping."""
