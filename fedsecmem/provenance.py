"""Where the running code comes from: its git commit (results.json, a saved model's manifest)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["source_commit"]

GIT_TIMEOUT_S = 10


def source_commit() -> str | None:
    """The git commit of the source tree the package runs from, "+changes" appended when files
    differ from it; None outside a git checkout (an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=GIT_TIMEOUT_S).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")
