"""How often agents say they are alive, and how long a silence means stalled: the one place both sides read.

A frozen process (SIGSTOP, a swapped-out device, a hung driver) keeps its TCP connection open, so the broker's
keepalive notices it only after 1.5 x the keepalive plus the will's delay (about a minute here). Agents therefore
publish a small heartbeat every ``HEARTBEAT_INTERVAL_S`` from a thread of their own, independent of training, and the
coordinator declares an agent stalled once it has heard none for ``STALL_AFTER_S`` (several missed beats, so a busy
CPU or a lost QoS 0 packet does not count). Heartbeats are signed with the agent's report key and carry a strictly
increasing sequence number, so nobody else can keep a dead agent "alive" and a replayed beat is ignored.
"""

from __future__ import annotations

HEARTBEAT_INTERVAL_S = 2.0
STALL_AFTER_S = 12.0
