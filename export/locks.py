"""One builder at a time for anything built once into the HeteroTune home (bundles, converted backbones).

Two processes that need the same artefact (a benchmark beside a coordinator, two benchmark runs, a test run
beside a demo) used to build it in the same staging directory, and the second one's clean-up deleted the first
one's files mid-build. With the lock the second waits, then finds the artefact finished and reuses it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` (released by the kernel if the process dies)."""
    import fcntl  # the builder runs on Linux or macOS; devices never build bundles

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
