"""Where things come from: the running code's git commit (results.json, a saved model's manifest)
and the SHA-256 of files (weights, a model's files)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

__all__ = ["file_sha256", "hash_file", "source_commit"]

GIT_TIMEOUT_S = 10
HASH_CHUNK = 1 << 24
_file_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process


def hash_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read now."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoized within the process on (path, size, mtime_ns): for large files
    read many times (backbone weights); a file that must be checked as it is now uses ``hash_file``."""
    path = Path(path).resolve()
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    digest = _file_digests.get(memo)
    if digest is None:
        digest = hash_file(path)
        _file_digests[memo] = digest
    return digest


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
