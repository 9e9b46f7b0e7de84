"""fl/v1 control messages: small, versioned, strictly validated JSON.

Everything arriving over MQTT is untrusted, so decoding is strict (no "5" -> 5 coercion, no
unknown fields, no NaN, no duplicate keys) and every failure is reduced to one line that can go into
a log or an UpdateAck reason. Bulk data never travels in these messages: they carry ``BlobRefModel``
addresses of chunked blobs instead, which keeps each message far below ``MAX_MESSAGE_BYTES``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar, overload

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from protocols.chunks import BlobRef
from protocols.errors import MessageError
from protocols.tensor_codec import Encoding
from protocols.topics import SHA256_PATTERN, validate_agent_id

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
SEALED_TYPE = "sealed"  # a signed envelope around one message (protocols/signing.py)

AgentId = Annotated[str, AfterValidator(validate_agent_id)]
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Text = Annotated[str, StringConstraints(max_length=4096)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]

_CONFIG = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BlobRefModel(BaseModel):
    model_config = _CONFIG

    sha256: Sha256Hex
    size: NonNegInt
    chunks: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _chunks_fit_size(self) -> BlobRefModel:
        if self.chunks > max(1, self.size):
            raise ValueError(f"{self.chunks} chunks is impossible for a blob of {self.size} bytes")
        return self

    def to_ref(self) -> BlobRef:
        return BlobRef(sha256=self.sha256, size=self.size, chunks=self.chunks)

    @classmethod
    def from_ref(cls, ref: BlobRef) -> BlobRefModel:
        return cls(sha256=ref.sha256, size=ref.size, chunks=ref.chunks)


class DeviceProfile(BaseModel):
    model_config = _CONFIG

    ram_total_mb: NonNegFloat
    ram_available_mb: NonNegFloat
    cores: Annotated[int, Field(ge=1)]
    arch: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    gflops: NonNegFloat
    disk_free_mb: NonNegFloat
    backends: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]]
    max_memory_mb: Annotated[float, Field(gt=0)] | None = None
    max_round_seconds: Annotated[float, Field(gt=0)] | None = None
    # The trainer backend this agent will train with (one of ``backends``): its peak memory differs by backend,
    # so the coordinator assigns with that backend's cost card. None (agents from before the field) = ORT.
    backend: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None

    @property
    def memory_budget_mb(self) -> float:
        """What the agent may actually use: free RAM, capped by the owner's limit if one is set."""
        if self.max_memory_mb is None:
            return self.ram_available_mb
        return min(self.ram_available_mb, self.max_memory_mb)


class RoundMetrics(BaseModel):
    model_config = _CONFIG

    personal_accuracy: Fraction
    global_accuracy: Fraction | None
    n_test: NonNegInt
    n_global_test: NonNegInt
    train_loss: float
    train_seconds: NonNegFloat
    eval_seconds: NonNegFloat
    peak_rss_mb: NonNegFloat
    bytes_down: NonNegInt
    backend: Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Message(BaseModel):
    model_config = _CONFIG

    v: Literal[1] = 1


class JoinRequest(_Message):
    type: Literal["join"] = "join"
    agent_id: AgentId
    nonce: Token
    profile: DeviceProfile
    n_train: NonNegInt
    n_test: NonNegInt
    n_global_test: NonNegInt = 0
    n_public: NonNegInt = 0  # samples in the run's public set this device holds (consensus distillation)
    # The agent's own Ed25519 public key (hex): its reports are signed with it (protocols/signing.py).
    agent_key: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    # HMAC of the run's join token over this request (coordinator/admission.py), when the run uses a token.
    proof: Sha256Hex | None = None


class JoinAccepted(_Message):
    type: Literal["join_accepted"] = "join_accepted"
    run_id: Token
    agent_id: AgentId
    backbone: Token
    bundle: BlobRefModel
    explanation: Text
    nonce: Token | None = None  # the JoinRequest's: an agent acts only on the answer to its own join
    # The run's task labels, so an agent checks its data file against them before it downloads the bundle
    # (None from a coordinator that does not send them: the agent checks after the bundle's manifest instead).
    labels: Annotated[list[Token], Field(min_length=1, max_length=1024)] | None = None


class JoinRefused(_Message):
    type: Literal["join_refused"] = "join_refused"
    agent_id: AgentId
    reason: Text
    nonce: Token | None = None


class Assignment(_Message):
    type: Literal["assignment"] = "assignment"
    run_id: Token
    round: Annotated[int, Field(ge=1)]
    nonce: Token
    backbone: Token
    bundle: BlobRefModel
    weights: BlobRefModel
    upload_names: list[Annotated[str, StringConstraints(min_length=1, max_length=512)]]
    local_steps: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)]
    learning_rate: Annotated[float, Field(gt=0)]
    deadline_unix: float
    seed: int
    # fedproto's lambda (0 = no prototype term); the prototypes themselves arrive with the weights.
    prototype_weight: Annotated[float, Field(ge=0)] = 0.0
    # Consensus distillation: steps on the public set's consensus labels (0 = none); the consensus arrives
    # with the weights.
    distill_steps: Annotated[int, Field(ge=0)] = 0
    distill_local_prior: bool = False
    distill_confident_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Public-set anchoring: steps pulling the public samples' representations towards the anchors (0 = none),
    # at this weight; the anchors arrive with the weights.
    anchor_steps: Annotated[int, Field(ge=0)] = 0
    anchor_weight: Annotated[float, Field(ge=0)] = 0.0
    # The final evaluation after the last round: no training, no tensors back (an empty update), only the
    # metrics of the received model (global view) and of the device's own final model (personal view).
    evaluate_only: bool = False
    # The wire encoding of the weights blob and of the update the device sends back (protocols/tensor_codec.py).
    encoding: Encoding = "fp32"


class UpdateReport(_Message):
    type: Literal["update"] = "update"
    run_id: Token
    agent_id: AgentId
    round: Annotated[int, Field(ge=1)]
    nonce: Token
    update: BlobRefModel
    n_train: NonNegInt
    metrics: RoundMetrics
    # How the update blob is encoded; a bounded string, so an unknown one is rejected with a reason on decode.
    encoding: Annotated[str, StringConstraints(min_length=1, max_length=16)] = "fp32"


class RoundDeclined(_Message):
    """An assigned device that cannot finish the round (e.g. it hit its memory cap) says so, so the coordinator
    stops waiting for it instead of running into the deadline."""

    type: Literal["declined"] = "declined"
    run_id: Token
    agent_id: AgentId
    round: Annotated[int, Field(ge=1)]
    nonce: Token
    reason: Text


class UpdateAck(_Message):
    type: Literal["update_ack"] = "update_ack"
    round: NonNegInt
    nonce: Token
    accepted: bool
    reason: Text = ""


class ResendRequest(_Message):
    type: Literal["resend"] = "resend"
    blob: Sha256Hex
    indices: Annotated[list[NonNegInt], Field(min_length=1)]


FinishCode = Literal["completed", "aborted", "coordinator_stopped"]


class Finish(_Message):
    type: Literal["finish"] = "finish"
    run_id: Token
    reason: Text
    # Why the run ended, for the agent's exit code (edge_agent/agent.py EXIT_*): every round done, the run gave up
    # (too few agents, a round missed its minimum, no live agents), or its coordinator was stopped (Ctrl-C/SIGTERM).
    code: FinishCode = "completed"


class Heartbeat(_Message):
    """An agent's "still here", every HEARTBEAT_INTERVAL_S, signed with its report key (protocols/liveness.py)."""

    type: Literal["heartbeat"] = "heartbeat"
    agent_id: AgentId


class CoordStatus(_Message):
    type: Literal["coord_status"] = "coord_status"
    state: Literal["online", "offline"]
    run_id: Token | None = None


class AgentStatus(_Message):
    type: Literal["agent_status"] = "agent_status"
    agent_id: AgentId
    state: Literal["online", "training", "uploading", "idle", "left", "lost"]
    # Why a device left (bad data, stopped by its owner, a failed download): the coordinator drops it at once
    # and logs this, instead of waiting out the round's deadline for it.
    reason: Text = ""


Message = Annotated[
    JoinRequest
    | JoinAccepted
    | JoinRefused
    | Assignment
    | UpdateReport
    | RoundDeclined
    | UpdateAck
    | ResendRequest
    | Finish
    | CoordStatus
    | AgentStatus
    | Heartbeat,
    Field(discriminator="type"),
]

MESSAGE_TYPES: tuple[type[_Message], ...] = (
    JoinRequest,
    JoinAccepted,
    JoinRefused,
    Assignment,
    UpdateReport,
    RoundDeclined,
    UpdateAck,
    ResendRequest,
    Finish,
    CoordStatus,
    Heartbeat,
    AgentStatus,
)
_BY_TYPE: Mapping[str, type[_Message]] = MappingProxyType(
    {cls.model_fields["type"].default: cls for cls in MESSAGE_TYPES}
)

M = TypeVar("M", bound=_Message)


def encode_message(msg: _Message) -> bytes:
    if not isinstance(msg, _Message):
        raise MessageError(f"cannot encode {type(msg).__name__}: not an fl/v1 message model")
    data = msg.model_dump_json().encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(
            f"{getattr(msg, 'type', '?')} message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte "
            "limit; "
            "move bulk data into a chunked blob and send its BlobRef"
        )
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<message>"
        parts.append(f"field {loc!r}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


@overload
def decode_message(payload: bytes, expected: None = None) -> Message: ...
@overload
def decode_message(payload: bytes, expected: type[M]) -> M: ...
@overload
def decode_message(payload: bytes, expected: tuple[type[_Message], ...]) -> Message: ...


def decode_message(
    payload: bytes, expected: type[_Message] | tuple[type[_Message], ...] | None = None
) -> _Message:
    """Parse an untrusted payload; raise ``MessageError`` with a one-line reason on any defect.

    A signed envelope is unwrapped WITHOUT checking its signature (for tools and observers); whoever acts on a
    message must verify it first (edge_agent/trust.py, coordinator/admission.py)."""
    return _decode(payload, expected, sealed=False)


def _decode(payload: bytes, expected: type[_Message] | tuple[type[_Message], ...] | None, *, sealed: bool
            ) -> _Message:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MessageError(f"message payload is a {type(payload).__name__}, not bytes")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(
            f"message too large: {len(payload)} bytes > {MAX_MESSAGE_BYTES}; bulk data must be sent as "
            "a chunked blob"
        )
    try:
        obj = json.loads(
            bytes(payload).decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_reject_duplicates,
        )
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"message is not UTF-8 JSON: {exc}; the sender must use encode_message") from exc
    if not isinstance(obj, dict):
        raise MessageError(f"message is a JSON {type(obj).__name__}, expected an object with 'v' and 'type'")
    version = obj.get("v")
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise MessageError(
            f"unsupported protocol version v={version!r}; this build speaks v={PROTOCOL_VERSION} — "
            "upgrade the older side so coordinator and agents match"
        )
    kind = obj.get("type")
    if kind == SEALED_TYPE and not sealed:
        body = obj.get("body")
        if not isinstance(body, str):
            raise MessageError("sealed envelope without a string body")
        try:
            inner = body.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise MessageError(f"sealed envelope body is not valid text: {exc}") from None
        return _decode(inner, expected, sealed=True)
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageError(f"unknown message type {kind!r}; expected one of {sorted(_BY_TYPE)}")
    try:
        msg = cls.model_validate(obj, strict=True)
    except ValidationError as exc:
        raise MessageError(f"invalid {kind!r} message: {_summarise(exc)}") from exc
    if expected is not None:
        wanted = expected if isinstance(expected, tuple) else (expected,)
        if not isinstance(msg, wanted):
            names = ", ".join(repr(c.model_fields["type"].default) for c in wanted)
            raise MessageError(f"unexpected message type {kind!r} here; expected {names}")
    return msg
