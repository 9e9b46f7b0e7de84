"""Liveness from agents' heartbeats (protocols/liveness.py): pure functions on monotonic timestamps.

The coordinator keeps, per agent, when it last accepted an authentic heartbeat (``heard``, None until the first)
and the highest heartbeat sequence it accepted. Liveness applies only to agents that have sent a heartbeat: an
agent that joined without a signing key, or an older agent, is judged by its last will as before.
"""

from __future__ import annotations

from protocols.errors import MessageError
from protocols.liveness import STALL_AFTER_S
from protocols.signing import parse_sealed, public_key_from_hex, verify

# A replacement is invited only while at least this share of the round's time is left: a device that starts late
# should still be able to train and upload before the deadline.
REPLACE_MIN_TIME_LEFT = 0.5


def stalled(heard: float | None, now: float, stall_after: float = STALL_AFTER_S) -> bool:
    """True once an agent that has sent heartbeats has been silent for longer than ``stall_after`` seconds."""
    return heard is not None and now - heard > stall_after


def heartbeat_seq(agent_key: str | None, topic: str, payload: bytes, run_id: str, last_seq: int) -> int:
    """The sequence number of an authentic, fresh heartbeat; raises MessageError for anything else.

    Authentic: sealed by the key the agent joined with, for this topic and run. Fresh: its sequence is above
    ``last_seq`` (a replay, even of a genuine beat, cannot keep a frozen agent alive). An agent without a key on
    record cannot prove a beat is its own, so its beats are never accepted."""
    if agent_key is None:
        raise MessageError("heartbeat from an agent that joined without a signing key; ignored")
    sealed = parse_sealed(payload)
    if sealed is None:
        raise MessageError("unsigned heartbeat; ignored")
    verify(sealed, public_key_from_hex(agent_key))
    if sealed.topic != topic or sealed.run != run_id:
        raise MessageError(f"heartbeat signed for {sealed.topic} in run {sealed.run}; replayed from elsewhere")
    if sealed.seq <= last_seq:
        raise MessageError(f"heartbeat sequence {sealed.seq} is not above {last_seq}: a replay")
    return sealed.seq


def replacements_wanted(target: int, accepted: int, open_uploads: int) -> int:
    """How many standby agents to invite so the round can still reach its target: the target less what is in
    hand and what is still expected (never negative)."""
    return max(0, target - accepted - open_uploads)


def time_allows_replacement(now: float, deadline: float, round_timeout: float,
                            min_left: float = REPLACE_MIN_TIME_LEFT) -> bool:
    """A replacement has a fair chance only if at least ``min_left`` of the round's time remains."""
    return deadline - now >= min_left * round_timeout
