"""Durable writes: after a crash or a power cut a file holds either its previous content or the whole new one.

One implementation for every file the system must not lose half of (device state, keys, the run's broker record,
generated pages): a temporary file in the same directory, written and fsynced, renamed over the target, then the
directory fsynced so the rename itself survives. The previous file stays intact until the rename.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the directory entry changes (a rename, a new file) in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically; ``mode`` (e.g. 0o600 for a private key) is set before any byte
    is written, so a secret is never readable by others, not even half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
