"""Put this interpreter's native libraries into the page cache in one known shape before a peak RSS is measured,
so a cost card does not depend on how the machine happened to read them before.

A process's RSS counts the file pages it has mapped, and on a page fault Linux maps more than the faulting page:
its neighbours in the page cache ("fault-around") and, on this kernel (6.18, ext4 with large folios), the whole
folio the page sits in. So the same training run shows a different resident set depending on whether a library
is cached at all, and on the size of the folios it was cached in, which depends on *how* it entered the cache:

* the torch probe on tiny-3 read 302 MB right after torch's libraries were evicted, 378 MB with them cached;
* with every library cached, it read 300 MB in a venv whose libraries were still cached as pip had written
  them, and 366-400 MB in one whose libraries had been read back through readahead (large folios);
* CI measured a 317 MB card, then a test evicted and re-read the libraries, and an agent peaked at 385 MB.

``warm`` therefore evicts every library's pages that no process maps and reads the file back sequentially, so
the cache holds it as readahead leaves it (large folios), the same shape for every probe and agent that runs
after it. (It does not make absolute numbers portable: the torch card on tiny-3 still read 304-313 MB in a
long-used venv and 373-386 MB in fresh checkouts; within one machine state card and agent agree.) Pages another
process has mapped stay as they are (the kernel does not evict them), which is harmless: they look the same to
every later process too.

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
    """The directories this interpreter imports installed packages from (platlib and purelib, once each)."""
    paths = sysconfig.get_paths()
    return sorted({Path(paths["platlib"]), Path(paths["purelib"])})


def warm(roots: Iterable[Path] | None = None) -> int:
    """Evict, then read back, every native library under ``roots`` (default: this interpreter's site-packages),
    returning the bytes read. Costs one read of the libraries from disk (~1 s for torch's 450 MB here)."""
    total = 0
    buffer = bytearray(_READ_CHUNK)
    for path in native_libraries(site_package_roots() if roots is None else roots):
        try:
            with path.open("rb", buffering=0) as handle:
                _evict(handle.fileno())
                while count := handle.readinto(buffer):
                    total += count
        except OSError:  # unreadable: it cannot be mapped by this process either
            continue
    return total


def _evict(fd: int) -> None:
    """Drop the file's cached pages that no process maps (a no-op where the call does not exist)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
