"""Privacy accounting, signed ledgers, leakage attacks and privacy reports."""
