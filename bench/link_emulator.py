"""An emulated edge link: a loopback TCP proxy that shapes bandwidth, adds latency and cuts on command.

Test and benchmark tooling, not product. Why a proxy and not ``tc netem`` in a network namespace: it
needs no root, runs inside a test, counts the bytes that really crossed the link and can cut a
connection at an exact byte count (e.g. halfway through a bundle download).

What it emulates, per direction and per connection:

* **bandwidth**: a token bucket (``rate_bps`` bits per second, ``burst`` bytes); bytes leave only when
  tokens allow, so throughput converges to the rate.
* **latency**: every segment is released ``rtt / 2`` after it arrived (each direction), so a request and
  its answer see one ``rtt``.
* **loss**: TCP never loses bytes for the application, it retransmits them late. A lost segment is
  emulated as what TCP makes of it: with probability ``loss`` a segment (at most ``segment`` bytes) is
  held back one retransmission timeout (``rto``, default 200 ms + rtt) and everything behind it waits
  too (head-of-line blocking). No byte is dropped; this is not packet loss, only its cost in time.
* **cuts**: ``cut()`` closes every open connection at once (both sides see a reset/EOF, like a dead
  radio); ``cut_after_down(n)`` cuts when ``n`` more bytes went down (broker to device). ``refuse``
  makes new connections fail until cleared (a link that stays down).

Counters ``bytes_down`` and ``bytes_up`` are the bytes delivered across the link, over all connections.
"""

from __future__ import annotations

import contextlib
import heapq
import random
import socket
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkSpec:
    rate_bps: float | None = 1_000_000.0  # None = unlimited
    rtt: float = 0.2
    loss: float = 0.0
    segment: int = 1448  # a TCP MSS on Ethernet
    burst: int = 16 * 1024
    rto: float | None = None  # default: 0.2 s + rtt (Linux's minimum RTO plus one round trip)
    seed: int = 0


class _Bucket:
    """Token bucket: ``take(n)`` returns when ``n`` bytes may pass at ``rate`` bytes/s."""

    def __init__(self, rate: float | None, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self, n: int, stop: threading.Event) -> None:
        if self._rate is None:
            return
        while not stop.is_set():
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            if self._tokens >= n:
                self._tokens -= n
                return
            time.sleep(min(0.05, (n - self._tokens) / self._rate))


class _Pipe:
    """One direction of one connection: a reader thread stamps segments, a writer releases them shaped."""

    def __init__(self, link: EdgeLink, src: socket.socket, dst: socket.socket, down: bool, stop: threading.Event):
        self._link, self._src, self._dst, self._down, self._stop = link, src, dst, down, stop
        spec = link.spec
        self._delay = spec.rtt / 2
        self._rto = spec.rto if spec.rto is not None else 0.2 + spec.rtt
        self._bucket = _Bucket(None if spec.rate_bps is None else spec.rate_bps / 8, max(spec.burst, spec.segment))
        self._queue: list[tuple[float, int, bytes]] = []
        self._queued = 0
        # Backpressure like a TCP window: hold at most one bandwidth-delay product plus 64 KiB in flight, so a
        # cut loses what a real link would have in flight, not everything the sender managed to write.
        bdp = 0 if spec.rate_bps is None else int(spec.rate_bps / 8 * spec.rtt)
        self._window = bdp + 64 * 1024
        self._seq = 0
        self._cond = threading.Condition()
        self._eof = False

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        seg = self._link.spec.segment
        try:
            while not self._stop.is_set():
                data = self._src.recv(64 * 1024)
                if not data:
                    break
                due = time.monotonic() + self._delay
                with self._cond:
                    while self._queued >= self._window and not self._stop.is_set():
                        self._cond.wait(0.1)
                    self._queued += len(data)
                    for i in range(0, len(data), seg):
                        heapq.heappush(self._queue, (due, self._seq, data[i : i + seg]))
                        self._seq += 1
                    self._cond.notify_all()
        except OSError:
            pass
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _write(self) -> None:
        try:
            while not self._stop.is_set():
                with self._cond:
                    while not self._queue and not self._eof and not self._stop.is_set():
                        self._cond.wait(0.1)
                    if not self._queue:
                        if self._eof:
                            break
                        continue
                    due, _, data = self._queue[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        self._cond.wait(min(wait, 0.05))
                        continue
                    heapq.heappop(self._queue)
                    self._queued -= len(data)
                    self._cond.notify_all()
                if self._link.lost():
                    self._stop.wait(self._rto)  # retransmitted one RTO later; the bytes behind it wait
                self._bucket.take(len(data), self._stop)
                if self._stop.is_set():
                    break
                self._dst.sendall(data)
                self._link.count(len(data), self._down)
        except OSError:
            pass
        self._link.close_connection(self._stop)


class EdgeLink:
    """Listens on 127.0.0.1:``port`` (0 = any free port) and forwards every connection to ``target``."""

    def __init__(self, target: tuple[str, int], spec: LinkSpec | None = None) -> None:
        self.target = target
        self.spec = spec or LinkSpec()
        self.refuse = False
        self.bytes_down = 0
        self.bytes_up = 0
        self.cuts = 0
        self._rng = random.Random(self.spec.seed)
        self._lock = threading.Lock()
        self._conns: dict[threading.Event, tuple[socket.socket, socket.socket]] = {}
        self._cut_at: int | None = None
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    # -- controls
    def cut(self) -> None:
        """Close every open connection now (both ends see the link die)."""
        with self._lock:
            self.cuts += 1
        self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            stops = list(self._conns)
        for stop in stops:
            self.close_connection(stop)

    def cut_after_down(self, n: int) -> None:
        """Cut once ``n`` more bytes have gone down the link."""
        with self._lock:
            self._cut_at = self.bytes_down + n

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        self._close_all()

    def __enter__(self) -> EdgeLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- used by the pipes
    def lost(self) -> bool:
        with self._lock:
            return self.spec.loss > 0 and self._rng.random() < self.spec.loss

    def count(self, n: int, down: bool) -> None:
        cut = False
        with self._lock:
            if down:
                self.bytes_down += n
                if self._cut_at is not None and self.bytes_down >= self._cut_at:
                    self._cut_at = None
                    cut = True
            else:
                self.bytes_up += n
        if cut:
            self.cut()

    def close_connection(self, stop: threading.Event) -> None:
        stop.set()
        with self._lock:
            pair = self._conns.pop(stop, None)
        for sock in pair or ():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stop = threading.Event()
            with self._lock:
                self._conns[stop] = (client, upstream)
            _Pipe(self, upstream, client, True, stop).start()
            _Pipe(self, client, upstream, False, stop).start()
