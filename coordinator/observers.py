"""Round observers: what the engine tells the outside world while a round runs (the start of issue 20's hooks).

Why a protocol and not more logging: a console printer, a test that counts events, or (later) a tracking
backend all want the same few facts at the same moments, and none of them may slow down or break a round. The
engine therefore calls a :class:`ObserverSet`, which hands each event to every observer and logs (never
raises) whatever an observer throws. Events are small frozen records; observers must not block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

log = logging.getLogger("coordinator")

Outcome = Literal["accepted", "rejected", "declined", "lost"]


@dataclass(frozen=True)
class RoundStarted:
    """Assignments were sent: ``selected`` agents invited, ``target`` updates wanted, ``needed`` to commit."""

    round_id: int
    attempt: int
    selected: tuple[str, ...]
    target: int
    needed: int
    deadline_unix: float


@dataclass(frozen=True)
class UpdateHandled:
    """One invited agent's round ended for the coordinator: its update was accepted or rejected (with the
    reason), it declined the round, or it was lost (its last will arrived) before reporting. A later event for the
    same agent, round and attempt replaces an earlier one: an update accepted on arrival is still rejected when
    it lies beyond the relative norm bound, which is known only once the round's updates are all in."""

    round_id: int
    attempt: int
    agent_id: str
    outcome: Outcome
    reason: str = ""


@dataclass(frozen=True)
class RoundEnded:
    """The round was committed, or abandoned (too few accepted updates; it is retried or the run stops)."""

    round_id: int
    attempt: int
    committed: bool
    selected: int
    accepted: int
    seconds: float


class RoundObserver(Protocol):
    """Anything that wants to watch rounds. Called on the engine's thread: return quickly, never block."""

    def round_started(self, event: RoundStarted) -> None: ...

    def update_handled(self, event: UpdateHandled) -> None: ...

    def round_ended(self, event: RoundEnded) -> None: ...


@dataclass
class ObserverSet:
    """Fan an event out to every observer; an observer's exception is logged, never propagated into a round."""

    observers: list[RoundObserver] = field(default_factory=list)

    def round_started(self, event: RoundStarted) -> None:
        self._each(lambda o: o.round_started(event))

    def update_handled(self, event: UpdateHandled) -> None:
        self._each(lambda o: o.update_handled(event))

    def round_ended(self, event: RoundEnded) -> None:
        self._each(lambda o: o.round_ended(event))

    def _each(self, call: Callable[[RoundObserver], None]) -> None:
        for observer in self.observers:
            try:
                call(observer)
            except Exception:  # an observer is never worth a round
                log.exception("round observer %r failed; the round goes on", observer)


@dataclass
class _Progress:
    started: RoundStarted
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # agent -> its latest outcome this round

    @property
    def counts(self) -> dict[str, int]:
        counts = {"accepted": 0, "rejected": 0, "declined": 0, "lost": 0}
        for outcome in self.outcomes.values():
            counts[outcome] += 1
        return counts


class ProgressPrinter:
    """One console line per round event: agents reported / selected, the outcome counts, and seconds left to
    the round's deadline. ``write`` takes a finished line (e.g. a rich Console's ``print``)."""

    def __init__(self, write: Callable[[str], None], clock: Callable[[], float] = time.time) -> None:
        self.write = write
        self.clock = clock
        self._round: _Progress | None = None

    def round_started(self, event: RoundStarted) -> None:
        self._round = _Progress(event)
        retry = f" (attempt {event.attempt + 1})" if event.attempt else ""
        self.write(f"round {event.round_id}{retry}: {len(event.selected)} agents selected, {event.target} updates "
                   f"wanted, {event.needed} needed; {self._left(event)}")

    def update_handled(self, event: UpdateHandled) -> None:
        progress = self._round
        if progress is None or progress.started.round_id != event.round_id:
            return
        progress.outcomes[event.agent_id] = event.outcome
        counts = progress.counts
        reported = counts["accepted"] + counts["rejected"]
        detail = f": {event.reason[:60]}" if event.reason else ""
        self.write(f"round {event.round_id}: {event.agent_id} {event.outcome}{detail} | reported "
                   f"{reported}/{len(progress.started.selected)}, accepted {counts['accepted']}, rejected "
                   f"{counts['rejected']}, declined {counts['declined']}, lost {counts['lost']}; "
                   f"{self._left(progress.started)}")

    def round_ended(self, event: RoundEnded) -> None:
        state = "committed" if event.committed else "abandoned"
        self.write(f"round {event.round_id}: {state} with {event.accepted}/{event.selected} accepted updates "
                   f"after {event.seconds:.1f} s")
        self._round = None

    def _left(self, started: RoundStarted) -> str:
        return f"{max(0.0, started.deadline_unix - self.clock()):.0f} s left"

