"""Put this interpreter's native libraries into the page cache in one known shape before a peak RSS is measured,
so a cost card does not depend on how the machine happened to read them before.

A process's RSS counts the file pages it has mapped, and on a page fault Linux maps more than the faulting page:
its neighbours in the page cache ("fault-around") and, on this kernel (6.18, ext4 with large folios), the whole
folio the page sits in. So the same training run shows a different resident set depending on how a library
entered the page cache. Measured with a private copy of torch that no other process mapped (torch probe on
tiny-3, docs/cost-cards.md "Cards under load"): libtorch_cpu.so's resident pages were 67 MB and the card 316 MB
when the library was cold, as ``cp`` had written it, read page by page, or read with readahead off; 170 MB and
419 MB after one sequential read (readahead builds large folios). The anonymous memory was 172-174 MB every time.

Every ordinary path (pip writing the wheel, a process faulting the library in from a cold cache) leaves base
pages; on this machine the sequential read was made by the probe itself (versions 5 and 6 read every library
back sequentially), so probes made the 380-400 MB state that agents then did or did not see. ``warm`` therefore
evicts every library's pages that no process maps and reads the file back with readahead off
(``POSIX_FADV_RANDOM``), which caches it in base pages: the shape every other path leaves. Pages another process
has mapped stay as they are (the kernel does not evict them); they look the same to every process that runs while
they are mapped, so a card and an agent run side by side still agree.

Standard library only: it runs before the probe imports anything heavy.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

_READ_CHUNK = 8 * 1024 * 1024


def native_libraries(roots: Iterable[Path]) -> Iterator[Path]:
    """Every shared object (``*.so``, ``*.so.N``) under ``roots``, each file once."""
    seen: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.so*")):
            real = path.resolve()
            if real in seen or not real.is_file() or not _is_shared_object(path.name):
                continue
            seen.add(real)
            yield real


def _is_shared_object(name: str) -> bool:
    stem, _, version = name.partition(".so")
    return bool(stem) and (version == "" or version.startswith("."))


def site_package_roots() -> list[Path]:
    """The directories this interpreter imports installed packages from: platlib and purelib, and the
    directories ``PYTHONPATH`` puts in front of them (once each)."""
    paths = sysconfig.get_paths()
    extra = [Path(entry) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return sorted({Path(paths["platlib"]), Path(paths["purelib"]), *extra})


def warm(roots: Iterable[Path] | None = None) -> int:
    """Evict, then read back in base pages, every native library under ``roots`` (default: this interpreter's
    site-packages), returning the bytes read. Costs one read of the libraries from disk (~1 s for torch's 450 MB
    here)."""
    total = 0
    buffer = bytearray(_READ_CHUNK)
    for path in native_libraries(site_package_roots() if roots is None else roots):
        try:
            with path.open("rb", buffering=0) as handle:
                _evict(handle.fileno())
                _readahead_off(handle.fileno())
                while count := handle.readinto(buffer):
                    total += count
        except OSError:  # unreadable: it cannot be mapped by this process either
            continue
    return total


def _evict(fd: int) -> None:
    """Drop the file's cached pages that no process maps (a no-op where the call does not exist)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _readahead_off(fd: int) -> None:
    """Read this file descriptor without readahead, so the pages it reads are cached as base pages rather than the
    large folios readahead allocates (a no-op where the call does not exist)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
