"""Who may join a run, and whose reports are authentic.

Admission: on a broker with the provisioned ACL the broker already ties each agent's topics to its username, so
only provisioned devices can publish a join for their own id. On a plain broker anyone can, so the run restricts
joins itself: an allow-list of agent ids (``allowed_agents`` in the run config) and/or a join token (a secret
given to the coordinator and each device in a file or an environment variable). A join request proves the token
with an HMAC over the run id and the whole request (protocols/signing.py ``join_proof``); the token is never
sent. A join that fails either check is refused with the reason and gets no bundle and no assignment.

Reports: every agent announces a per-process Ed25519 key in its join (``agent_key``) and signs its reports with
it. Once an agent joined with a key, a report on its topic must be signed with that key, for that topic and this
run, so nobody else can report for it even where the broker lets anyone write its topics. Without a join token
(or the provisioned ACL) whoever joins first under an id owns it; docs/security.md lists what needs which.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from protocols.errors import MessageError
from protocols.messages import JoinRequest
from protocols.signing import SealError, join_proof, parse_sealed, public_key_from_hex, verify


@dataclass(frozen=True)
class AdmissionPolicy:
    allowed: frozenset[str] | None = None  # None: any agent id
    token: bytes | None = None  # None: no join token required

    @property
    def is_open(self) -> bool:
        return self.allowed is None and self.token is None

    def refusal(self, request: JoinRequest, run_id: str) -> str | None:
        """Why this join is not admitted, or None if it is."""
        if self.allowed is not None and request.agent_id not in self.allowed:
            return (f"agent id {request.agent_id!r} is not on this run's allow-list (allowed_agents); ask the "
                    "operator to add it")
        if self.token is not None:
            if request.proof is None:
                return "this run requires a join token: start the agent with --join-token-file or HETEROTUNE_JOIN_TOKEN"
            if not hmac.compare_digest(request.proof, join_proof(self.token, run_id, request)):
                return "the join token proof does not match (wrong token, or a request copied from another run)"
        return None


def authentic_body(agent_key: str | None, topic: str, payload: bytes, run_id: str) -> bytes:
    """The message bytes to decode from an agent's report topic, checked against the key it joined with.

    With no key on record (an agent that joined without one) the payload is returned as it is. Raises
    MessageError with the reason for a report that is unsigned, forged, or signed for another topic or run.
    """
    if agent_key is None:
        return payload
    sealed = parse_sealed(payload)
    if sealed is None:
        raise SealError("unsigned report, but this agent joined with a signing key; a forgery or another process")
    verify(sealed, public_key_from_hex(agent_key))
    if sealed.topic != topic or sealed.run != run_id:
        raise MessageError(f"report signed for {sealed.topic} in run {sealed.run}; replayed from elsewhere")
    return sealed.body
