"""Warnings about what arrives from the network, at most one per kind per interval: a flood of forged or
malformed messages must not fill a device's or the coordinator's disk, and the first of each kind is still
logged with its reason."""

from __future__ import annotations

import logging
import time

LOG_EVERY_S = 30.0
MAX_KINDS = 1024  # kinds remembered; past this the memory is cleared (a flood of novel kinds logs more, never grows)


class RateLimitedLog:
    """Log a warning per reason kind at most once per interval, counting what was suppressed."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self.logger, self.every_s = logger, every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e18) < self.every_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        if len(self._last) >= MAX_KINDS:
            self._last.clear()
            self._suppressed.clear()
        more = self._suppressed.pop(kind, 0)
        self._last[kind] = now
        self.logger.warning("%s%s", message, f" ({more} more like it suppressed)" if more else "")
