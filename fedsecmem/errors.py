"""User-facing errors: a one-line message and exit code 2, never a traceback."""

__all__ = ["UserError"]


class UserError(Exception):
    """Bad configuration or input; the CLI prints ``error: <message>`` and exits 2."""

    exit_code = 2
