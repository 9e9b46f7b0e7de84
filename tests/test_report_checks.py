"""Nothing an agent reports is trusted: the report checks on hand-made numbers, and the coordinator's own join and
report handlers fuzzed with hypothesis (not only the decoders): no value an agent can send may raise.

The handlers run on a real Coordinator with a real tiny-3 bundle and a real run store; only the MQTT endpoint is
a stand-in that records what would be published (the transport is not what these tests are about).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.config import RunConfig, TaskConfig
from coordinator.engine import AgentRecord, Coordinator, PendingUpload
from coordinator.methods import scopes_for
from coordinator.report_checks import (
    Candidate,
    blob_ref_refusal,
    max_update_bytes,
    n_train_refusal,
    relative_norm_refusals,
)
from coordinator.runner import build_bundles
from coordinator.store import RunStore
from edge_agent.upload_guard import refused_upload_names
from export.dema.config import shared_local_families
from protocols import topics
from protocols.chunks import BlobRef, encode_chunk, split_blob
from protocols.errors import MessageError
from protocols.messages import UpdateAck, decode_message
from protocols.mqtt import Inbound
from protocols.signing import Signer, generate_key
from protocols.tensors import encode_tensors


def test_n_train_must_be_positive_and_at_most_what_was_declared() -> None:
    assert n_train_refusal(90, 90) is None and n_train_refusal(1, 90) is None
    assert "must be > 0" in str(n_train_refusal(0, 90))
    assert "must be > 0" in str(n_train_refusal(-5, 90))
    assert "exceeds the 90 training samples" in str(n_train_refusal(10**9, 90))


def test_relative_norm_bound_on_hand_computed_norms() -> None:
    def cand(agent: str, norm: float, group: str = "g") -> Candidate:
        return Candidate(agent, group, 10, norm, Path("/nonexistent"))

    # Median of (40, 41, 42, 9900) = 41.5; 3 x 41.5 = 124.5: only the 9900 goes.
    refused = relative_norm_refusals([cand("a", 40), cand("b", 41), cand("c", 42), cand("x", 9900)], 3.0)
    assert list(refused) == ["x"] and "median norm 41.5" in refused["x"]
    # 124.5 is the bound itself: kept; just above it: refused.
    assert relative_norm_refusals([cand("a", 40), cand("b", 41), cand("c", 42), cand("x", 124.5)], 3.0) == {}
    assert list(relative_norm_refusals([cand("a", 40), cand("b", 41), cand("c", 42), cand("x", 124.6)], 3.0)) == ["x"]
    # Per group: a bigger backbone's norms are not outliers of a smaller one's; two updates are no reference.
    mixed = [cand("a", 40), cand("b", 41), cand("c", 42), cand("d", 500, "big"), cand("e", 9000, "big")]
    assert relative_norm_refusals(mixed, 3.0) == {}


def test_blob_bounds() -> None:
    limit = max_update_bytes([(4, 4), (10,)])
    assert limit == 4 * 26 + (1 << 20)
    assert blob_ref_refusal(limit, 1, limit) is None
    assert "larger than" in str(blob_ref_refusal(limit + 1, 1, limit))
    assert "chunks" in str(blob_ref_refusal(4096, 5, limit))  # 5 chunks of < 1 KiB
    assert blob_ref_refusal(4096, 4, limit) is None


# --- the handlers themselves --------------------------------------------------------------------------------

class RecordingEndpoint:
    """Stands in for MqttEndpoint: records publishes, delivers nothing."""

    address = "127.0.0.1:0"

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def add_connect_listener(self, _listener: Any) -> None:
        pass

    def publish(self, topic: str, payload: bytes, **_kwargs: Any) -> int:
        self.published.append((topic, bytes(payload)))
        return len(self.published)

    def wait_published(self, _mid: int, timeout: float | None = None) -> bool:
        return True

    def get(self, timeout: float | None = None) -> None:
        return None


CONFIG = RunConfig(run_name="fuzz", backbones=("tiny-3",), rounds=1, local_steps=1, task=TaskConfig(max_length=32,
                   batch_size=8), allowed_agents=("a1", "a2"))


@pytest.fixture(scope="module")
def coordinator() -> Iterator[Coordinator]:
    bundles = build_bundles(CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp))
        yield Coordinator(CONFIG, bundles, RecordingEndpoint(), store, signing_key=generate_key())  # type: ignore[arg-type]
        store.close()


AGENT = Signer(generate_key())


def _reset(c: Coordinator) -> None:
    """One admitted agent a1 (declared 90 samples) with an open round-1 upload."""
    c.agents = {"a1": AgentRecord("a1", "tiny-3", 90, {}, key=AGENT.public_hex)}
    c.current_round = 1
    c.pending = {"a1": PendingUpload("a1", "nonce1", "tiny-3")}
    c.declined_rows = []


def _deliver(c: Coordinator, topic: str, payload: bytes) -> None:
    """The engine's own dispatch below its last-resort handler: an exception here is a bug."""
    agent_id, kind, extra = topics.parse_agent_topic(topic)
    c._handle(agent_id, kind, extra, Inbound(topic, payload, False))


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4)), max_leaves=12)
big_ints = st.one_of(st.integers(min_value=-3, max_value=3), st.integers(min_value=-(2**64), max_value=2**64))
numbers = st.one_of(big_ints, st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324]))


def _report(round_id: Any, nonce: Any, n_train: Any, size: Any, chunks: Any, metric: Any) -> dict[str, Any]:
    return {"v": 1, "type": "update", "run_id": "RUN", "agent_id": "a1", "round": round_id, "nonce": nonce,
            "update": {"sha256": "a" * 64, "size": size, "chunks": chunks}, "n_train": n_train,
            "metrics": {"personal_accuracy": 0.5, "global_accuracy": None, "n_test": metric, "n_global_test": 0,
                        "train_loss": metric, "train_seconds": 1.0, "eval_seconds": 1.0, "peak_rss_mb": 1.0,
                        "bytes_down": 1, "backend": "ort"}}


REPORT_FIELDS = ("round", "nonce", "n_train", "update.size", "update.chunks", "update.sha256", "metrics.n_test",
                 "metrics.train_loss", "metrics.personal_accuracy", "metrics.peak_rss_mb", "metrics.backend", "v",
                 "agent_id", "run_id")
field_values = st.one_of(big_ints, numbers, json_values, st.sampled_from([1, 90, 2**31, 2**63, "nonce1", "a1"]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(REPORT_FIELDS), field_values, min_size=1, max_size=3),
       signed=st.booleans())
def test_report_handler_survives_any_field_values(coordinator: Coordinator, changes: dict[str, Any],
                                                  signed: bool) -> None:
    """A valid report with one to three fields replaced by anything at all; then the round's upload is given
    every chance to act on it (the resend grace is over), as a real round would."""
    _reset(coordinator)
    report = _report(1, "nonce1", 90, 5000, 2, 0)
    report["run_id"] = coordinator.run_id
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        target = report
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    topic = topics.agent_report("a1")
    body = json.dumps(report).encode()
    _deliver(coordinator, topic, AGENT.seal(coordinator.run_id, topic, body) if signed else body)
    upload = coordinator.pending["a1"]
    if upload.report is not None:  # taken for assembly: then its numbers are within bounds
        limit = max_update_bytes(shape for shape, _ in coordinator._expected_tensors("tiny-3").values())
        assert 0 <= upload.report.update.size <= limit
        assert upload.assembler is not None and upload.assembler.ref.chunks <= max(1, math.ceil(
            upload.report.update.size / 1024))
        upload.report_time -= 3600  # past the resend grace: the coordinator asks for the missing chunks
    coordinator._try_finalize(upload)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())),
       kind=st.sampled_from(["join", "report", "request", "status", "update/1", "update/0", "inbox"]),
       agent=st.sampled_from(["a1", "a2", "intruder"]))
def test_every_agent_topic_survives_garbage(coordinator: Coordinator, payload: bytes, kind: str, agent: str) -> None:
    _reset(coordinator)
    _deliver(coordinator, f"fl/v1/agents/{agent}/{kind}", payload)
    coordinator._try_finalize(coordinator.pending["a1"])


profiles = st.fixed_dictionaries({
    "ram_total_mb": numbers, "ram_available_mb": numbers, "cores": big_ints, "arch": st.text(max_size=70),
    "gflops": numbers, "disk_free_mb": numbers, "backends": st.lists(st.sampled_from(["ort", "torch", "x"]),
                                                                     max_size=3),
    "max_memory_mb": st.one_of(st.none(), numbers), "max_round_seconds": st.one_of(st.none(), numbers),
    "backend": st.one_of(st.none(), st.sampled_from(["ort", "torch", "tpu"]))})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(profile=profiles, n_train=big_ints, n_test=big_ints, n_public=big_ints,
       agent=st.sampled_from(["a1", "a2", "intruder"]), key=st.sampled_from([None, "0" * 64, "f" * 64]))
def test_join_handler_survives_any_profile(coordinator: Coordinator, profile: dict[str, Any], n_train: Any,
                                           n_test: Any, n_public: Any, agent: str, key: str | None) -> None:
    _reset(coordinator)
    request = {"v": 1, "type": "join", "agent_id": agent, "nonce": "j", "profile": profile, "n_train": n_train,
               "n_test": n_test, "n_public": n_public, "agent_key": key}
    _deliver(coordinator, topics.agent_join(agent), json.dumps(request).encode())
    record = coordinator.agents.get(agent)
    assert agent != "intruder" or record is None, "a device off the allow-list was admitted"
    if record is not None and agent != "a1":
        assert record.n_train == n_train and n_train >= 0


def _sent_acks(c: Coordinator) -> list[UpdateAck]:
    acks = []
    for _topic, payload in c.endpoint.published:  # type: ignore[attr-defined]
        try:
            message = decode_message(payload)
        except MessageError:
            continue
        if isinstance(message, UpdateAck):
            acks.append(message)
    return acks


@pytest.mark.parametrize("n_train, reason", [(0, "must be > 0"), (10**9, "exceeds the 90"), (90, "")])
def test_n_train_is_checked_against_the_declared_count(coordinator: Coordinator, n_train: int, reason: str) -> None:
    """A complete, well-formed update with an impossible sample count is rejected with the reason (the ack says
    it); the declared count itself is accepted."""
    _reset(coordinator)
    coordinator.endpoint.published.clear()  # type: ignore[attr-defined]
    weights = {n: np.zeros(shape, np.float32) for n, (shape, _) in coordinator._expected_tensors("tiny-3").items()}
    blob = encode_tensors(weights)
    ref = BlobRef.from_blob(blob)
    for chunk in split_blob(blob):
        _deliver(coordinator, topics.agent_update_chunk("a1", 1), encode_chunk(chunk))
    report = _report(1, "nonce1", n_train, ref.size, ref.chunks, 0)
    report["run_id"], report["update"]["sha256"] = coordinator.run_id, ref.sha256
    topic = topics.agent_report("a1")
    _deliver(coordinator, topic, AGENT.seal(coordinator.run_id, topic, json.dumps(report).encode()))
    outcome = coordinator._try_finalize(coordinator.pending["a1"])
    assert outcome is not None
    candidate, row = outcome
    assert (candidate is None) == bool(reason) and row.accepted == (not reason) and reason in row.reason
    assert [a.accepted for a in _sent_acks(coordinator)] == [not reason]


def test_an_unsigned_report_for_an_agent_with_a_key_is_ignored(coordinator: Coordinator) -> None:
    _reset(coordinator)
    report = _report(1, "nonce1", 90, 5000, 1, 0)
    report["run_id"] = coordinator.run_id
    _deliver(coordinator, topics.agent_report("a1"), json.dumps(report).encode())
    assert coordinator.pending["a1"].report is None


def test_the_agent_never_uploads_a_local_tensor() -> None:
    manifest = build_bundles(CONFIG)["tiny-3"].manifest
    local = [t.name for t in manifest.tensors if t.scope == "local"]
    shared = [t.name for t in manifest.tensors if t.scope != "local"]
    assert any(name.startswith("head.") for name in local), "the default head scope is local"
    assert refused_upload_names(manifest, [*shared, "proto.0", "distill.probs", "anchor.repr"]) == {}
    refused = refused_upload_names(manifest, [*shared, *local, "made.up"])
    assert set(refused) == {*local, "made.up"}
    assert all("never leaves it" in refused[n] for n in local)


def test_a_run_that_shares_the_head_gets_bundles_that_say_so() -> None:
    """`[scopes] head = "group"` is a documented run setting: its bundles mark the head group-scoped, so the agent's
    guard lets it travel; every other tensor keeps the default bundles' scope, and default runs keep their bundles."""
    assert shared_local_families({"head": "group", "experts": "global", "private": "local"}) == (("head", "group"),)
    assert shared_local_families(scopes_for("heterotune")) == ()
    default = build_bundles(CONFIG)["tiny-3"]
    shared_head = build_bundles(CONFIG.model_copy(update={"scopes": {"head": "group"}}))["tiny-3"]
    assert shared_head.sha256 != default.sha256
    scopes = {t.name: t.scope for t in shared_head.manifest.tensors}
    assert {s for n, s in scopes.items() if n.startswith("head.")} == {"group"}
    assert {n: s for n, s in scopes.items() if not n.startswith("head.")} == \
        {t.name: t.scope for t in default.manifest.tensors if not t.name.startswith("head.")}
    assert refused_upload_names(shared_head.manifest, [n for n in scopes if n.startswith("head.")]) == {}
