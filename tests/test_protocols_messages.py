from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from protocols import topics
from protocols.chunks import BlobRef
from protocols.errors import MessageError, ProtocolError, TopicError
from protocols.messages import (
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    AgentStatus,
    Assignment,
    BlobRefModel,
    CoordStatus,
    DeviceProfile,
    Finish,
    Heartbeat,
    JoinAccepted,
    JoinRefused,
    JoinRequest,
    ResendRequest,
    RoundDeclined,
    RoundMetrics,
    UpdateAck,
    UpdateReport,
    decode_message,
    encode_message,
)

SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4
PROFILE = DeviceProfile(
    ram_total_mb=8000.0,
    ram_available_mb=5000.0,
    cores=4,
    arch="aarch64",
    gflops=12.5,
    disk_free_mb=20000.0,
    backends=["ort-training"],
    max_memory_mb=3000.0,
    max_round_seconds=600.0,
)
METRICS = RoundMetrics(
    personal_accuracy=0.8,
    global_accuracy=None,
    n_test=100,
    n_global_test=0,
    train_loss=0.42,
    train_seconds=12.0,
    eval_seconds=1.5,
    peak_rss_mb=700.0,
    bytes_down=123456,
    backend="ort-training",
)
BUNDLE = BlobRefModel(sha256=SHA_A, size=1000, chunks=1)
WEIGHTS = BlobRefModel(sha256=SHA_B, size=600_000, chunks=3)

SAMPLES = [
    JoinRequest(
        agent_id="pi4-kitchen-01", nonce="n1", profile=PROFILE, n_train=500, n_test=100, n_global_test=50
    ),
    JoinAccepted(
        run_id="run-1", agent_id="a1", backbone="bert-tiny", bundle=BUNDLE, explanation="fits in 3 GB"
    ),
    JoinRefused(agent_id="a1", reason="not enough memory: 120 MB < 400 MB"),
    Assignment(
        run_id="run-1",
        round=3,
        nonce="r3-a1",
        backbone="bert-tiny",
        bundle=BUNDLE,
        weights=WEIGHTS,
        upload_names=["adapter.lora_A", "adapter.lora_B"],
        local_steps=20,
        batch_size=8,
        learning_rate=1e-4,
        deadline_unix=1.7e9,
        seed=7,
    ),
    UpdateReport(
        run_id="run-1", agent_id="a1", round=3, nonce="r3-a1", update=WEIGHTS, n_train=500, metrics=METRICS
    ),
    RoundDeclined(run_id="run-1", agent_id="a1", round=3, nonce="r3-a1", reason="memory cap exceeded"),
    UpdateAck(round=3, nonce="r3-a1", accepted=False, reason="norm 12.3 above bound 10"),
    ResendRequest(blob=SHA_B, indices=[0, 2]),
    Finish(run_id="run-1", reason="10 rounds done"),
    Finish(run_id="run-1", reason="round 2 missed its minimum", code="aborted"),
    Heartbeat(agent_id="a1"),
    CoordStatus(state="online", run_id="run-1"),
    AgentStatus(agent_id="a1", state="training"),
]


def _obj(msg: Any) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(encode_message(msg))
    return result


def _bytes(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Any) -> None:
    payload = encode_message(msg)
    obj = json.loads(payload)
    assert obj["v"] == 1 and obj["type"] == msg.type
    back = decode_message(payload)
    assert type(back) is type(msg)
    assert back == msg
    assert decode_message(payload, type(msg)) == msg
    assert encode_message(back) == payload  # canonical: re-encoding is byte-identical


def test_blobref_model_converts_to_and_from_chunks_ref() -> None:
    ref = BlobRef(sha256=SHA_B, size=600_000, chunks=3)
    assert BlobRefModel.from_ref(ref) == WEIGHTS
    assert WEIGHTS.to_ref() == ref


def test_memory_budget_is_the_smaller_of_free_ram_and_owner_limit() -> None:
    assert PROFILE.memory_budget_mb == 3000.0
    assert PROFILE.model_copy(update={"max_memory_mb": None}).memory_budget_mb == 5000.0
    assert PROFILE.model_copy(update={"max_memory_mb": 9000.0}).memory_budget_mb == 5000.0


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b'{"v": 1, ', "not UTF-8 JSON"),
        (b"", "not UTF-8 JSON"),
        (b"[1, 2]", "JSON list"),
        (b'"join"', "JSON str"),
        (b'{"v": 1, "type": "join", "type": "join"}', "duplicate key"),
    ],
)
def test_not_json_or_not_an_object(payload: bytes, needle: str) -> None:
    with pytest.raises(MessageError, match=needle):
        decode_message(payload)


def test_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(MessageError, match=r"unknown message type 'hello'.*'join'"):
        decode_message(_bytes({"v": 1, "type": "hello"}))
    with pytest.raises(MessageError, match="unknown message type None"):
        decode_message(_bytes({"v": 1}))


@pytest.mark.parametrize("version", [2, 0, "1", None, True, 1.5])
def test_wrong_version(version: object) -> None:
    obj = _obj(SAMPLES[-1])
    obj["v"] = version
    with pytest.raises(MessageError, match="unsupported protocol version"):
        decode_message(_bytes(obj))


def test_missing_version_is_rejected() -> None:
    obj = _obj(SAMPLES[-1])
    del obj["v"]
    with pytest.raises(MessageError, match="unsupported protocol version v=None"):
        decode_message(_bytes(obj))


@pytest.mark.parametrize("agent_id", ["", "a/b", "+", "#", "-lead", "x" * 65, "a b", "ä1", "a\x00"])
def test_bad_agent_id_is_rejected(agent_id: str) -> None:
    obj = _obj(SAMPLES[-1])
    obj["agent_id"] = agent_id
    with pytest.raises(MessageError, match=r"field 'agent_id'.*invalid agent id"):
        decode_message(_bytes(obj))
    with pytest.raises(ValidationError):
        AgentStatus(agent_id=agent_id, state="online")
    with pytest.raises(TopicError):
        topics.validate_agent_id(agent_id)


def test_extra_field_is_rejected() -> None:
    obj = _obj(SAMPLES[0])
    obj["surprise"] = 1
    with pytest.raises(MessageError, match="field 'surprise': Extra inputs are not permitted"):
        decode_message(_bytes(obj))
    nested = _obj(SAMPLES[0])
    nested["profile"]["gpu"] = "none"
    with pytest.raises(MessageError, match=r"field 'profile\.gpu'"):
        decode_message(_bytes(nested))


def test_field_errors_are_summarised_with_their_path() -> None:
    obj = _obj(SAMPLES[0])
    obj["profile"]["cores"] = "four"
    del obj["n_train"]
    with pytest.raises(MessageError) as info:
        decode_message(_bytes(obj))
    text = str(info.value)
    assert "invalid 'join' message" in text
    assert "field 'profile.cores'" in text and "field 'n_train': Field required" in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("index", "field", "value"),
    [
        (0, "n_train", "5"),  # strict: no string -> int coercion from the wire
        (0, "n_train", True),
        (0, "n_train", -1),
        (3, "round", 0),
        (3, "learning_rate", 0.0),
        (3, "local_steps", 2.0),
        (6, "indices", []),
        (6, "indices", [-1]),
        (6, "blob", "A" * 64),
        (8, "state", "sleeping"),
    ],
)
def test_invalid_field_values(index: int, field: str, value: object) -> None:
    obj = _obj(SAMPLES[index])
    obj[field] = value
    with pytest.raises(MessageError, match=f"field '{field}"):
        decode_message(_bytes(obj))


def test_nan_and_bad_blob_refs_are_rejected() -> None:
    text = encode_message(SAMPLES[4]).replace(b'"train_loss":0.42', b'"train_loss":NaN')
    with pytest.raises(MessageError, match="NaN is not valid JSON"):
        decode_message(text)
    obj = _obj(SAMPLES[3])
    obj["weights"] = {"sha256": SHA_A, "size": 10, "chunks": 11}
    with pytest.raises(MessageError, match=r"field 'weights'.*impossible"):
        decode_message(_bytes(obj))


def test_oversize_is_rejected_before_parsing() -> None:
    big = b'{"v":1,"type":"finish","run_id":"r","reason":"' + b"x" * MAX_MESSAGE_BYTES + b'"}'
    with pytest.raises(MessageError, match=r"message too large: \d+ bytes > 65536"):
        decode_message(big)
    with pytest.raises(MessageError, match="over the 65536-byte limit"):
        encode_message(ResendRequest(blob=SHA_A, indices=list(range(20000))))


def test_wrong_expected_type() -> None:
    payload = encode_message(SAMPLES[0])
    with pytest.raises(MessageError, match=r"unexpected message type 'join' here; expected 'update'"):
        decode_message(payload, UpdateReport)
    with pytest.raises(MessageError, match="expected 'update', 'resend'"):
        decode_message(payload, (UpdateReport, ResendRequest))
    assert isinstance(decode_message(payload, (UpdateReport, JoinRequest)), JoinRequest)


def test_message_errors_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError):
        decode_message(b"nope")


def test_protocols_do_not_import_heavy_ml_packages() -> None:
    code = (
        "import sys, protocols, protocols.messages, protocols.chunks, protocols.tensors, protocols.mqtt, "
        "protocols.topics\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_topic_layout() -> None:
    assert topics.coord_status() == "fl/v1/coord/status"
    assert topics.agent_join("a1") == "fl/v1/agents/a1/join"
    assert topics.agent_status("a1") == "fl/v1/agents/a1/status"
    assert topics.agent_inbox("a1") == "fl/v1/agents/a1/inbox"
    assert topics.agent_report("a1") == "fl/v1/agents/a1/report"
    assert topics.agent_request("a1") == "fl/v1/agents/a1/request"
    assert topics.agent_update_chunk("a1", 3) == "fl/v1/agents/a1/update/3"
    assert topics.blob_chunk(SHA_A, 7) == f"fl/v1/blobs/{SHA_A}/7"
    assert topics.blob_filter(SHA_A) == f"fl/v1/blobs/{SHA_A}/+"
    assert topics.update_filter() == "fl/v1/agents/+/update/+"
    for kind in ("join", "status", "report", "request"):
        assert topics.agents_filter(kind) == f"fl/v1/agents/+/{kind}"


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        ("fl/v1/agents/a1/update/3", ("a1", "update", "3")),
        ("fl/v1/agents/pi.4_b-2/report", ("pi.4_b-2", "report", None)),
        ("fl/v1/agents/a1/inbox", ("a1", "inbox", None)),
    ],
)
def test_parse_agent_topic(topic: str, parsed: tuple[str, str, str | None]) -> None:
    assert topics.parse_agent_topic(topic) == parsed


@pytest.mark.parametrize(
    "topic",
    [
        "fl/v2/agents/a1/report",
        "fl/v1/coord/status",
        "fl/v1/agents/a1",
        "fl/v1/agents/a1/report/x",
        "fl/v1/agents/a1/unknown",
        "fl/v1/agents/a1/update",
        "fl/v1/agents/a1/update/x",
        "fl/v1/agents/a1/update/-1",
        "fl/v1/agents/+/report",
        "fl/v1/agents//report",
    ],
)
def test_parse_agent_topic_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(TopicError, match=r"topic|agent id"):
        topics.parse_agent_topic(topic)


def test_topic_builders_validate_their_arguments() -> None:
    with pytest.raises(TopicError, match="64 lowercase hex"):
        topics.blob_chunk("A" * 64, 0)
    with pytest.raises(TopicError, match="64 lowercase hex"):
        topics.blob_filter("abc")
    with pytest.raises(TopicError, match="chunk index"):
        topics.blob_chunk(SHA_A, -1)
    with pytest.raises(TopicError, match="agent id"):
        topics.agent_inbox("a/+")
    with pytest.raises(TopicError, match="round id"):
        topics.agent_update_chunk("a1", -2)
    with pytest.raises(TopicError, match="update_filter"):
        topics.agents_filter("update")
    assert topics.parse_blob_topic(f"fl/v1/blobs/{SHA_A}/12") == (SHA_A, 12)
    with pytest.raises(TopicError):
        topics.parse_blob_topic(f"fl/v1/blobs/{SHA_A}/+")
