"""The real coordinator with a stopwatch, measured from outside the engine.

`TimedCoordinator` subclasses `coordinator.engine.Coordinator` and wraps the steps of a round (publishing
the weights, the first pump after the assignments went out, every `_try_finalize` call, the strategy's
`aggregate`, the store's `commit_round` and `save_update`) with wall-clock timestamps. The engine itself
is not changed: every wrapper calls the original and only records when it started and ended.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import cpu_seconds, rss_mb
from coordinator.aggregation import AggregationResult, ClientUpdate, FederatedState, Strategy
from coordinator.engine import Coordinator, PendingUpload, RoundResult
from coordinator.report_checks import Candidate
from coordinator.store import MetricRow, RunStore
from protocols.chunks import BlobRef


@dataclass
class RoundTimes:
    """Wall-clock (time.time()) marks of one round on the coordinator, plus its CPU and memory."""

    round_id: int
    start: float
    cpu_start: float
    rss_start_mb: float
    weights_published: float = 0.0
    assignments_sent: float = 0.0
    reports: dict[str, float] = field(default_factory=dict)
    last_chunk: dict[str, float] = field(default_factory=dict)
    finalize: dict[str, tuple[float, float]] = field(default_factory=dict)
    save_update_s: dict[str, float] = field(default_factory=dict)
    saved: dict[str, float] = field(default_factory=dict)  # when each accepted update was on disk
    pumps: int = 0  # loop iterations: each one scans every pending upload
    scan_calls: int = 0  # (detailed only) _try_finalize calls that finalized nothing
    scan_seconds: float = 0.0
    aggregate: tuple[float, float] = (0.0, 0.0)
    commit: tuple[float, float] = (0.0, 0.0)
    end: float = 0.0
    seconds: float = 0.0  # RoundResult.seconds, the engine's own measure
    cpu_end: float = 0.0
    rss_before_aggregate_mb: float = 0.0
    rss_peak_mb: float = 0.0  # highest sampled VmRSS during the round
    abandoned: bool = False
    thread_cpu_s: dict[str, float] = field(default_factory=dict)  # per thread, when the runner records it
    selected: int = 0
    accepted: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TimedRunStore(RunStore):
    """RunStore whose two writes per round are timed into the coordinator's current round."""

    owner: TimedCoordinator | None = None

    def commit_round(self, round_id: int, state: FederatedState, *, started: float, selected: int,
                     metrics: list[MetricRow], diagnostics: Mapping[str, Any]) -> Path:
        t0 = time.time()
        path = super().commit_round(round_id, state, started=started, selected=selected, metrics=metrics,
                                    diagnostics=diagnostics)
        if self.owner is not None and self.owner.current is not None:
            self.owner.current.commit = (t0, time.time())
            self.owner.current.selected = selected
            self.owner.current.accepted = sum(m.accepted for m in metrics)
        return path

    def save_update(self, round_id: int, agent_id: str, tensors: Mapping[str, np.ndarray]) -> Path:
        t0 = time.perf_counter()
        path = super().save_update(round_id, agent_id, tensors)
        if self.owner is not None and self.owner.current is not None:
            self.owner.current.save_update_s[agent_id] = time.perf_counter() - t0
            self.owner.current.saved[agent_id] = time.time()
        return path


class TimedStrategy:
    """Wraps an aggregation strategy; records when `aggregate` ran."""

    def __init__(self, inner: Strategy, owner: TimedCoordinator) -> None:
        self._inner = inner
        self._owner = owner

    @property
    def name(self) -> str:
        return self._inner.name

    def aggregate(self, state: FederatedState, updates: Sequence[ClientUpdate], round_id: int
                  ) -> AggregationResult:
        current = self._owner.current
        if current is not None:
            current.rss_before_aggregate_mb = rss_mb()
        t0 = time.time()
        result = self._inner.aggregate(state, updates, round_id)
        if current is not None:
            current.aggregate = (t0, time.time())
        return result


class RssSampler:
    """Samples this process's VmRSS every `interval_s` on a daemon thread; `take_peak()` resets the peak."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self._interval = interval_s
        self._peak = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            value = rss_mb()
            with self._lock:
                self._peak = max(self._peak, value)

    def take_peak(self) -> float:
        with self._lock:
            peak, self._peak = max(self._peak, rss_mb()), rss_mb()
        return peak


class TimedCoordinator(Coordinator):
    """Coordinator that keeps a `RoundTimes` per round (abandoned rounds included) in `self.rounds`.

    Its hooks run O(1) or O(messages) times per round, so they do not distort a 1,000-agent round; the
    per-upload `_try_finalize` timing, which runs once per pending upload per message, is in
    `DetailedTimedCoordinator` for small fleets only.
    """

    def __init__(self, *args: Any, sampler: RssSampler | None = None, expected_agents: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected_agents = expected_agents
        self.current: RoundTimes | None = None
        self.rounds: list[RoundTimes] = []
        self.joined_at: dict[str, float] = {}
        self.run_started = 0.0
        self.sampler = sampler
        self.strategy = TimedStrategy(self.strategy, self)
        if isinstance(self.store, TimedRunStore):
            self.store.owner = self

    def run(self) -> list[RoundResult]:
        self.run_started = time.time()
        return super().run()

    def _on_join(self, request: Any, *args: Any, **kwargs: Any) -> None:
        super()._on_join(request, *args, **kwargs)
        self.joined_at.setdefault(request.agent_id, time.time())

    def _wait_for_agents(self, *args: Any, **kwargs: Any) -> None:
        """With `expected_agents`, stop waiting as soon as every expected agent was admitted or refused."""
        if self.expected_agents is None:
            super()._wait_for_agents(*args, **kwargs)
            return
        deadline = time.monotonic() + self.config.join_timeout_s
        while len(self.agents) + len(self.refused) < self.expected_agents and time.monotonic() < deadline:
            self._pump(0.5)
        if not self.agents:
            raise TimeoutError(f"none of the {self.expected_agents} benchmark agents joined "
                               f"within {self.config.join_timeout_s:.0f} s")
        self._pump_until(time.monotonic() + 0.5)

    def _run_round(self, round_id: int, *args: Any, **kwargs: Any) -> RoundResult | None:
        if self.sampler is not None:
            self.sampler.take_peak()
        times = RoundTimes(round_id, start=time.time(), cpu_start=cpu_seconds(), rss_start_mb=rss_mb())
        self.current = times
        try:
            result = super()._run_round(round_id, *args, **kwargs)
        finally:
            times.end = time.time()
            times.cpu_end = cpu_seconds()
            times.rss_peak_mb = self.sampler.take_peak() if self.sampler is not None else rss_mb()
            self.current = None
            self.rounds.append(times)
        times.abandoned = result is None
        if result is not None:
            times.seconds = result.seconds
        return result

    def _publish_weights(self, *args: Any, **kwargs: Any) -> dict[str, BlobRef]:
        refs = super()._publish_weights(*args, **kwargs)
        if self.current is not None:
            self.current.weights_published = time.time()
        return refs

    def _pump(self, timeout: float) -> str | None:
        current = self.current
        if current is not None:
            current.pumps += 1
            if current.weights_published and not current.assignments_sent:
                current.assignments_sent = time.time()  # the engine pumps right after the last assignment
        return super()._pump(timeout)  # the engine finalises the round of the agent it names

    def _on_chunk(self, agent_id: str, round_text: str | None, payload: bytes, *args: Any, **kwargs: Any) -> None:
        super()._on_chunk(agent_id, round_text, payload, *args, **kwargs)
        if self.current is not None and round_text == str(self.current_round):
            self.current.last_chunk[agent_id] = time.time()

    def _on_report(self, report: Any, *args: Any, **kwargs: Any) -> None:
        super()._on_report(report, *args, **kwargs)
        if self.current is not None and report.round == self.current_round:
            self.current.reports.setdefault(report.agent_id, time.time())

    def scan_cost(self, uploads: int, repeats: int = 5) -> float:
        """Seconds one pass of the round loop's scan costs over `uploads` finished uploads (after the run).

        Times the engine's own `_try_finalize` on uploads that are already done, which is what every
        message costs the loop once its uploads are finished: the fastest of `repeats` passes.
        """
        names = {f.name for f in dataclasses.fields(PendingUpload)}
        extra: dict[str, Any] = {"backbone": "scan"} if "backbone" in names else {}  # fields change over time
        pending = [PendingUpload(f"scan-{i}", "nonce", done=True, **extra) for i in range(uploads)]
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for upload in pending:
                Coordinator._try_finalize(self, upload)
            best = min(best, time.perf_counter() - t0)
        return best


class DetailedTimedCoordinator(TimedCoordinator):
    """Also times every `_try_finalize` call (start and end of each accepted upload's validation)."""

    def _try_finalize(self, upload: PendingUpload, *args: Any, **kwargs: Any
                      ) -> tuple[Candidate | None, MetricRow] | None:
        current = self.current
        wall = time.time()
        t0 = time.perf_counter()
        outcome = super()._try_finalize(upload, *args, **kwargs)
        elapsed = time.perf_counter() - t0
        if current is not None:
            if outcome is None:
                current.scan_calls += 1
                current.scan_seconds += elapsed
            else:
                current.finalize[upload.agent_id] = (wall, wall + elapsed)
        return outcome
