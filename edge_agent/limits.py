"""What a device may spend on a round: its memory cap, enforced for real, and an emulated slowdown.

An emulated fleet runs every "device" on one builder-class machine, so each agent has to behave like the
hardware it stands for:

* **memory** — the agent measures its own resident set between units of work (loading the round, every
  training step, every evaluation batch) and aborts the round with `MemoryCapExceeded` once it has crossed
  its cap. The check reads the kernel's high-water mark (VmHWM) as well as the current RSS, so a peak
  reached *inside* a step is caught exactly, without a sampling thread that could miss it. ONNX Runtime
  cannot be interrupted inside a step, so a step is the granularity of the abort; no OS limit fits better
  (RLIMIT_AS counts the runtime's reserved address space, cgroups need privileges an agent does not have).
* **compute** — after every training step and evaluation batch the agent sleeps ``(slowdown - 1) x`` the
  time the work took, and the GFLOP/s it reports at join are divided by ``slowdown``, so the coordinator's
  round-time prediction and the real round time both see the slower device.

Imports only the standard library and psutil (the device never imports torch, transformers or onnx).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")


def _status_mb(key: str) -> float | None:
    """A ``Vm*`` line of /proc/self/status in MB, or None off Linux."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


def current_rss_mb() -> float:
    """Resident set size of this process now, in MB."""
    value = _status_mb("VmRSS")
    if value is not None:
        return value
    import psutil

    return float(psutil.Process().memory_info().rss) / (1024 * 1024)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    On Linux this reads VmHWM, which starts afresh at exec; ru_maxrss does not, so a probe spawned by a
    builder holding torch and a model would report the builder's peak instead of its own.
    """
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class MemoryCapExceeded(RuntimeError):
    """The round used more memory than the device allows; the round is abandoned, the agent carries on."""

    def __init__(self, cap_mb: float, reached_mb: float, during: str) -> None:
        self.cap_mb, self.reached_mb, self.during = cap_mb, reached_mb, during
        super().__init__(
            f"memory cap exceeded: resident memory reached {reached_mb:.0f} MB during {during}, above this "
            f"device's cap of {cap_mb:.0f} MB (--max-memory); the round was aborted and no update is sent. "
            "The backbone's cost card underestimates this device's footprint; rejoin with a higher cap or "
            "ask the operator to rebuild the bundle's cost card"
        )


def check_slowdown(slowdown: float) -> float:
    """A slowdown factor is >= 1: an emulated device can be slower than its host, never faster."""
    if not (math.isfinite(slowdown) and slowdown >= 1):
        raise ValueError(f"slowdown must be a finite number >= 1 (1 = this machine's speed), got {slowdown}")
    return float(slowdown)


def slowed_profile(profile: Mapping[str, Any], slowdown: float) -> dict[str, Any]:
    """The device profile an emulated slower device reports: measured GFLOP/s divided by ``slowdown``."""
    factor = check_slowdown(slowdown)
    out = dict(profile)
    out["gflops"] = float(out["gflops"]) / factor
    return out


@dataclass
class DeviceLimits:
    """The round guard of one agent (implements ``edge_agent.local_round.RoundGuard``).

    ``memory_cap_mb=None`` checks nothing; ``slowdown=1`` never sleeps. ``clock`` and ``sleep`` are
    injectable so the arithmetic can be tested without waiting.
    """

    memory_cap_mb: float | None = None
    slowdown: float = 1.0
    sleep: Callable[[float], None] = time.sleep
    rss: Callable[[], float] = current_rss_mb
    peak: Callable[[], float] = peak_rss_mb
    slept_seconds: float = field(default=0.0, init=False)
    _peak_at_begin: float = field(default=0.0, init=False)
    _counts: dict[str, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        check_slowdown(self.slowdown)
        if self.memory_cap_mb is not None and not (self.memory_cap_mb > 0 and math.isfinite(self.memory_cap_mb)):
            raise ValueError(f"memory cap must be a positive number of MB, got {self.memory_cap_mb}")

    def begin(self) -> None:
        """A round starts: remember the high-water mark so far (a peak from fetching the bundle at join
        is not this round's doing) and check we are not over the cap already."""
        self._peak_at_begin = self.peak()
        self._counts = {}
        self.slept_seconds = 0.0
        self._check("the start of the round")

    def after(self, kind: str, seconds: float) -> None:
        """One unit of work of ``kind`` ("load", "train" or "eval") took ``seconds``: check memory, then
        stretch the time if this device is emulated as slower."""
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self._check(_describe(kind, self._counts[kind]))
        if kind != "load" and self.slowdown > 1 and seconds > 0:
            pause = (self.slowdown - 1) * seconds
            self.slept_seconds += pause
            self.sleep(pause)

    def _check(self, during: str) -> None:
        cap = self.memory_cap_mb
        if cap is None:
            return
        now = self.rss()
        if now > cap:
            raise MemoryCapExceeded(cap, now, during)
        peak = self.peak()
        if peak > cap and peak > self._peak_at_begin:
            raise MemoryCapExceeded(cap, peak, during)


def _describe(kind: str, count: int) -> str:
    if kind == "load":
        return "loading the round's model"
    if kind == "train":
        return f"training step {count}"
    if kind == "eval":
        return f"evaluation batch {count}"
    return f"{kind} {count}"
