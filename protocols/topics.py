"""The fl/v1 topic layout (reference/mqtt.md §4) as pure functions.

Topics are built and parsed only here so that the ACL patterns, the coordinator and the agents can
never drift apart. Every identifier that ends up in a topic is validated first: a ``+``, ``#``,
``/`` or NUL smuggled in through an agent id would otherwise widen a subscription or make the
broker drop the connection ("Malformed packet").
"""

from __future__ import annotations

import re

from protocols.errors import TopicError

PREFIX = "fl/v1"

AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

_AGENT_ID_RE = re.compile(AGENT_ID_PATTERN)
_SHA256_RE = re.compile(SHA256_PATTERN)

# Per-agent topic kinds without an extra level; "update" carries the round id as an extra level.
AGENT_KINDS = frozenset({"join", "status", "inbox", "report", "request", "heartbeat"})
FILTER_KINDS = frozenset({"join", "status", "report", "request", "heartbeat"})
UPDATE_KIND = "update"


def validate_agent_id(agent_id: str) -> str:
    """Return ``agent_id`` unchanged if it is safe to use as a topic level, MQTT username and client id."""
    if not isinstance(agent_id, str) or _AGENT_ID_RE.fullmatch(agent_id) is None:
        raise TopicError(
            f"invalid agent id {agent_id!r}: it must be 1-64 characters of letters, digits, '_', '.' or "
            "'-' and start with a letter or digit; choose an id like 'pi4-kitchen-01'"
        )
    return agent_id


def validate_sha256(sha256: str) -> str:
    """Return ``sha256`` unchanged if it is 64 lowercase hex digits (the blob address format)."""
    if not isinstance(sha256, str) or _SHA256_RE.fullmatch(sha256) is None:
        raise TopicError(
            f"invalid blob sha256 {sha256!r}: expected 64 lowercase hex digits as produced by "
            "hashlib.sha256(data).hexdigest()"
        )
    return sha256


def _validate_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise TopicError(f"invalid chunk index {index!r}: expected an int >= 0")
    return index


def _validate_round(round_id: int) -> int:
    if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
        raise TopicError(f"invalid round id {round_id!r}: expected an int >= 0")
    return round_id


def coord_status() -> str:
    return f"{PREFIX}/coord/status"


def _agent(agent_id: str, kind: str) -> str:
    return f"{PREFIX}/agents/{validate_agent_id(agent_id)}/{kind}"


def agent_join(agent_id: str) -> str:
    return _agent(agent_id, "join")


def agent_status(agent_id: str) -> str:
    return _agent(agent_id, "status")


def agent_inbox(agent_id: str) -> str:
    return _agent(agent_id, "inbox")


def agent_report(agent_id: str) -> str:
    """Agent -> coordinator: update manifests and metrics."""
    return _agent(agent_id, "report")


def agent_heartbeat(agent_id: str) -> str:
    """Agent -> coordinator: signed "still here" beats (protocols/liveness.py), so a frozen device is noticed."""
    return _agent(agent_id, "heartbeat")


def agent_request(agent_id: str) -> str:
    """Agent -> coordinator: requests such as "resend chunks of blob X"."""
    return _agent(agent_id, "request")


def agent_update_chunk(agent_id: str, round_id: int) -> str:
    """Agent -> coordinator: the chunk frames of one update (frames are self-describing)."""
    return f"{_agent(agent_id, UPDATE_KIND)}/{_validate_round(round_id)}"


def blob_chunk(sha256: str, index: int) -> str:
    return f"{PREFIX}/blobs/{validate_sha256(sha256)}/{_validate_index(index)}"


def blob_filter(sha256: str) -> str:
    return f"{PREFIX}/blobs/{validate_sha256(sha256)}/+"


def agents_filter(kind: str) -> str:
    """Coordinator-side wildcard for one per-agent kind (join/status/report/request)."""
    if kind not in FILTER_KINDS:
        raise TopicError(
            f"invalid agent topic kind {kind!r} for a filter: expected one of {sorted(FILTER_KINDS)}; "
            "use update_filter() for update chunks"
        )
    return f"{PREFIX}/agents/+/{kind}"


def update_filter() -> str:
    return f"{PREFIX}/agents/+/{UPDATE_KIND}/+"


def parse_agent_topic(topic: str) -> tuple[str, str, str | None]:
    """Split ``fl/v1/agents/{id}/{kind}[/{extra}]`` into ``(agent_id, kind, extra)``.

    The agent id comes from the topic, which the broker ACL ties to the authenticated user, so it is
    the trustworthy identity of the sender (unlike any agent_id inside the payload).
    """
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) < 5 or parts[0] != "fl" or parts[1] != "v1" or parts[2] != "agents":
        raise TopicError(f"topic {topic!r} is not an fl/v1 agent topic; expected {PREFIX}/agents/<id>/<kind>")
    agent_id, kind, rest = parts[3], parts[4], parts[5:]
    validate_agent_id(agent_id)
    if kind == UPDATE_KIND:
        if len(rest) != 1 or not rest[0].isascii() or not rest[0].isdigit() or len(rest[0]) > 18:
            raise TopicError(
                f"topic {topic!r}: update topics must be {PREFIX}/agents/<id>/update/<round> with a "
                "decimal round id"
            )
        return agent_id, kind, str(int(rest[0]))
    if kind not in AGENT_KINDS or rest:
        raise TopicError(
            f"topic {topic!r}: unknown agent topic kind {'/'.join([kind, *rest])!r}; expected one of "
            f"{sorted(AGENT_KINDS | {UPDATE_KIND + '/<round>'})}"
        )
    return agent_id, kind, None


def parse_blob_topic(topic: str) -> tuple[str, int]:
    """Split ``fl/v1/blobs/{sha}/{i}`` into ``(sha, i)``."""
    parts = topic.split("/") if isinstance(topic, str) else []
    if (
        len(parts) != 5
        or parts[:3] != ["fl", "v1", "blobs"]
        or not parts[4].isascii()
        or not parts[4].isdigit()
        or len(parts[4]) > 18
    ):
        raise TopicError(f"topic {topic!r} is not a blob chunk topic; expected {PREFIX}/blobs/<sha256>/<i>")
    return validate_sha256(parts[3]), int(parts[4])
