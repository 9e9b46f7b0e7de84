"""What an agent lets through from the broker: only the coordinator's signed messages, for this agent and run.

Every payload on the agent's inbox or the coordinator status topic may come from anyone who can reach the broker
(or be a retained message left by an earlier run). ``ControlGate.admit`` returns the message only if

- it is a signed envelope that verifies against the coordinator key the agent was given (``--coordinator-key``);
- it was signed for the topic it arrived on (no replays to another agent);
- its sequence number is above every one accepted on that topic (no replays of an earlier message);
- its run is the one the agent joined (join answers: the one it is joining; the coordinator status: any run, as
  that is how an agent learns about a new run), and the inner message names the same run.

Anything else is dropped with a reason, logged at most once per ``LOG_EVERY_S`` per kind of reason, so a flood of
forgeries cannot fill the device's disk. With ``verify=False`` (``--insecure-no-verify``) signatures are not
checked but every other rule still applies.
"""

from __future__ import annotations

import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocols.errors import MessageError
from protocols.messages import CoordStatus, JoinAccepted, JoinRefused, Message, decode_message
from protocols.rate_limited_log import RateLimitedLog
from protocols.signing import parse_sealed, verify

log = logging.getLogger("edge_agent")

class ControlGate:
    def __init__(self, coordinator_key: Ed25519PublicKey | None) -> None:
        self.key = coordinator_key
        self._last_seq: dict[str, int] = {}
        self.dropped = 0
        self._log = RateLimitedLog(log)

    def _drop(self, kind: str, topic: str, reason: str) -> None:
        self.dropped += 1
        self._log.warn(kind, f"ignored a message on {topic}: {reason}")

    def admit(self, topic: str, payload: bytes, *, joined_run: str | None, joining_run: str | None,
              join_nonce: str | None) -> Message | None:
        """The message if it may be acted on, else None (and the reason is logged, rate-limited)."""
        try:
            sealed = parse_sealed(payload)
        except MessageError as exc:
            self._drop("malformed", topic, str(exc))
            return None
        if sealed is None:
            self._drop("unsigned", topic, "not signed by the coordinator (plain messages are never acted on)")
            return None
        if self.key is not None:
            try:
                verify(sealed, self.key)
            except MessageError as exc:
                self._drop("signature", topic, str(exc))
                return None
        if sealed.topic != topic:
            self._drop("topic", topic, f"signed for {sealed.topic!r}: replayed from another topic")
            return None
        if sealed.seq <= self._last_seq.get(topic, -1):
            self._drop("replay", topic, f"sequence {sealed.seq} is not above the last accepted one: a replay")
            return None
        try:
            message = decode_message(sealed.body)
        except MessageError as exc:
            self._drop("malformed", topic, str(exc))
            return None
        inner_run = getattr(message, "run_id", None)
        if inner_run is not None and inner_run != sealed.run:
            self._drop("run", topic, f"envelope of run {sealed.run} carries a message of run {inner_run}")
            return None
        if isinstance(message, (JoinAccepted, JoinRefused)):
            if sealed.run != joining_run or message.nonce is None or message.nonce != join_nonce:
                self._drop("run", topic, f"a join answer for run {sealed.run} that is not the answer to this "
                                         "agent's own join request")
                return None
        elif not isinstance(message, CoordStatus) and (joined_run is None or sealed.run != joined_run):
            self._drop("run", topic, f"{message.type} for run {sealed.run}, but this agent is in run {joined_run}")
            return None
        self._last_seq[topic] = sealed.seq
        return message
