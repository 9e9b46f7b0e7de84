"""`coordinator run --tracking tensorboard:DIR`: every committed round's numbers as TensorBoard scalars.

Why an observer that reads the store: the engine tells observers only *that* a round ended; the numbers
(accuracy per backbone group in both views, outcome counts, bytes, the time split) are what the round committed
to coordinator.sqlite a moment before, and `coordinator report` computes its page from there. Reading them back
with the report's own functions (coordinator/run_report.py) means the dashboard and the report cannot disagree.
Only the agents lost mid-round are counted from the events, because the store does not tell them apart from
agents still training when the round closed. Writing is a local file append (no network), and tensorboardX is
imported only when tracking was asked for: it is an optional extra, off by default.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from coordinator.observers import Outcome, RoundEnded, RoundStarted, UpdateHandled
from coordinator.run_report import VIEWS, RoundSeries, RunRecords, read_round, round_series

log = logging.getLogger("coordinator")

FORMS = "tensorboard:DIR (the directory `tensorboard --logdir` reads, e.g. tensorboard:runs/tb/my-run)"
INSTALL = "pip install 'heterotune-edge[tracking]' (or: pip install tensorboardX)"


class TrackingError(ValueError):
    """--tracking cannot be honoured; the message says what is wrong and what to give instead."""


@dataclass(frozen=True)
class TrackingTarget:
    kind: str  # "tensorboard" (the only backend so far)
    location: Path


def parse_tracking(spec: str) -> TrackingTarget:
    """``tensorboard:DIR`` into a target, or a TrackingError naming the allowed forms."""
    kind, sep, rest = spec.partition(":")
    if kind.strip().lower() != "tensorboard" or not sep or not rest.strip():
        raise TrackingError(f"--tracking {spec!r} is not understood; the allowed form is {FORMS}")
    return TrackingTarget("tensorboard", Path(rest.strip()).expanduser())


def check_target(target: TrackingTarget) -> None:
    """Fail at the start of a run, not mid-run: the library must be installed and the directory writable."""
    if importlib.util.find_spec("tensorboardX") is None:
        raise TrackingError(f"--tracking {target.kind} needs tensorboardX, which is not installed: {INSTALL}")
    try:
        target.location.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.location, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise TrackingError(f"--tracking: cannot write to {target.location} ({exc}); give a directory you can "
                            f"create and write to") from None


def round_scalars(series: RoundSeries, lost: int) -> dict[str, float]:
    """The scalars one committed round is logged as (tag -> value); accuracies in 0-1, a group's accuracy only
    when one of its accepted agents reported it."""
    scalars: dict[str, float] = {
        f"accuracy/{view}/{group}": value
        for view in VIEWS for group, value in sorted(series.accuracy[view].items()) if value is not None}
    scalars.update({
        "agents/selected": series.selected, "agents/accepted": series.accepted, "agents/rejected": series.rejected,
        "agents/declined": series.declined, "agents/lost": lost, "agents/no_report": series.no_report,
        "round/attempts": series.attempts, "round/seconds": series.seconds,
        "bytes/up": series.bytes_up, "bytes/down": series.bytes_down})
    scalars.update({f"round/{part}_seconds": seconds for part, seconds in series.split.items()})
    return {tag: float(value) for tag, value in scalars.items()}


class ScalarWriter(Protocol):
    """What the tracker needs of tensorboardX's SummaryWriter."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None,
                   walltime: float | None = None) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """A RoundObserver: at each committed round's end, that round's scalars at step = round id (abandoned
    attempts show as ``round/attempts`` of the round that committed). Flushed every round, so TensorBoard shows
    a round as soon as it is committed."""

    def __init__(self, run_dir: Path, writer: ScalarWriter) -> None:
        self.run_dir = run_dir
        self.writer = writer
        self._outcomes: dict[str, Outcome] = {}  # agent -> its latest outcome in the current attempt
        self._round: tuple[int, int] | None = None

    def round_started(self, event: RoundStarted) -> None:
        self._round, self._outcomes = (event.round_id, event.attempt), {}

    def update_handled(self, event: UpdateHandled) -> None:
        if self._round == (event.round_id, event.attempt):
            self._outcomes[event.agent_id] = event.outcome

    def round_ended(self, event: RoundEnded) -> None:
        if not event.committed:
            return
        found = read_round(self.run_dir, event.round_id)
        if found is None:
            log.warning("tracking: round %d is not in the store; not logged", event.round_id)
            return
        stored, rows = found
        series = round_series(RunRecords(self.run_dir, "", "", [stored], rows))[0]
        lost = sum(outcome == "lost" for outcome in self._outcomes.values())
        for tag, value in round_scalars(series, lost).items():
            self.writer.add_scalar(tag, value, global_step=event.round_id, walltime=stored.finished)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(target: TrackingTarget, run_dir: Path) -> TensorBoardTracker:
    """The tracker of a checked target (check_target first); imports tensorboardX only now."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as exc:
        raise TrackingError(f"--tracking {target.kind} needs tensorboardX ({exc}): {INSTALL}") from None
    return TensorBoardTracker(run_dir, SummaryWriter(logdir=str(target.location)))
