"""Keep glibc from growing an agent's heap from its second round on: a fixed mmap threshold.

glibc serves each allocation above ``M_MMAP_THRESHOLD`` (128 KiB at start) with a mapping of its own, returned to
the system when freed, and by default raises that threshold to the size of every such block that is freed, up to
32 MB. A round ends by freeing ONNX Runtime's large buffers, so from the second round on, buffers of up to 32 MB
come from the heap instead, where they fragment it. Measured on MiniLM-L6 (bench.memory_prediction, 3 rounds x
20 steps): the agent peaked at 399 MB in round 1 and 442-443 MB in rounds 2 and 3, above its 412 MB cost card;
with the threshold fixed at 128 KiB, which also turns the adjustment off, it peaked at 399 / 405 / 405 MB.

Process-wide, so only entry points call it (``edge-agent join`` and the cost-card probe, which must measure
what an agent holds). Standard library only.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, kept for good


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold; False where the C library is not glibc (musl, macOS) and nothing changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl has no libc.so.6 (or no mallopt): nothing to fix there
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
