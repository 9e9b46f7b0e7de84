"""The chaos soak's schedule: which fault hits which round, drawn from a seed (pure; bench/chaos_soak.py acts).

Why a plan per round and not a timer: rounds take as long as the fleet needs, so a fault is tied to a round's
start (``offset_s`` after it) and to one of the agents that round invited (``pick``, an index into the sorted
invited list, so the same seed and the same selection hit the same agent). The last ``calm_rounds`` rounds get
no fault, so every agent is back and running when the final evaluation is sent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Kind = Literal["kill", "stall", "cut", "broker_restart"]
KINDS: tuple[Kind, ...] = ("kill", "stall", "cut")


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` at ``offset_s`` after round ``round_id`` starts, lasting ``duration_s``.

    kill: SIGKILL, restarted with the same id and state after ``duration_s``. stall: SIGSTOP, SIGCONT after
    ``duration_s``. cut: every connection through the agent's emulated link closed, and new ones refused for
    ``duration_s``. broker_restart: the run's broker stopped, started again on the same port after ``duration_s``.
    """

    round_id: int
    kind: Kind
    offset_s: float
    duration_s: float
    pick: int = 0  # index into the round's sorted invited agents (cut: into those behind an emulated link)


def chaos_plan(rounds: int, seed: int, *, calm_rounds: int = 2, broker_round: int | None = None,
               per_round: tuple[int, ...] = (0, 1, 1, 2, 2)) -> list[Fault]:
    """Faults for rounds 1..``rounds - calm_rounds``: ``per_round`` is the pool a round's fault count is drawn
    from; one broker restart at ``broker_round`` (default: the middle round; 0 = none)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    rng = random.Random(seed)
    last = max(0, rounds - calm_rounds)
    faults: list[Fault] = []
    for round_id in range(1, last + 1):
        picks = rng.sample(range(12), k=12)  # distinct agents within a round: one fault per agent at a time
        for i in range(rng.choice(per_round)):
            kind = rng.choice(KINDS)
            duration = {"kill": rng.uniform(2.0, 8.0), "stall": rng.choice((4.0, 16.0, 24.0)),
                        "cut": rng.choice((0.0, 3.0, 15.0))}[kind]
            faults.append(Fault(round_id, kind, round(rng.uniform(0.5, 4.0), 2), round(duration, 1), picks[i]))
    where = (rounds + 1) // 2 if broker_round is None else broker_round
    if 1 <= where <= last:
        faults.append(Fault(where, "broker_restart", round(rng.uniform(1.0, 3.0), 2), 3.0))
    return faults
