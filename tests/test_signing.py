"""Signed control messages, the agent's gate, admission proofs and report authentication, without a broker.

Each test forges what an attacker on a plain broker could send and checks it is refused for the right reason;
the attack suite (tests/test_attacks.py) replays the same forgeries against real agents and a real mosquitto.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from coordinator.admission import AdmissionPolicy, authentic_body
from edge_agent.trust import ControlGate
from protocols import topics
from protocols.errors import MessageError
from protocols.messages import (
    BlobRefModel,
    CoordStatus,
    DeviceProfile,
    Finish,
    JoinAccepted,
    JoinRefused,
    JoinRequest,
    UpdateAck,
    decode_message,
    encode_message,
)
from protocols.signing import (
    SealError,
    Signer,
    generate_key,
    join_proof,
    load_private_key,
    load_public_key,
    parse_sealed,
    public_key_hex,
    public_path,
    seal,
    verify,
    write_key_pair,
)

RUN = "run-1234"
INBOX = topics.agent_inbox("a1")
REF = BlobRefModel(sha256="0" * 64, size=10, chunks=1)


def _join(agent_id: str = "a1", n_train: int = 90, key: str | None = None) -> JoinRequest:
    profile = DeviceProfile(ram_total_mb=4096, ram_available_mb=4096, cores=2, arch="x86_64", gflops=10,
                            disk_free_mb=1e4, backends=["ort"])
    return JoinRequest(agent_id=agent_id, nonce="n1", profile=profile, n_train=n_train, n_test=30, agent_key=key)


def test_a_sealed_message_verifies_only_unchanged_and_only_with_its_key() -> None:
    key = generate_key()
    body = encode_message(Finish(run_id=RUN, reason="done"))
    sealed = parse_sealed(seal(key, run=RUN, topic=INBOX, seq=7, body=body))
    assert sealed is not None and sealed.body == body and sealed.seq == 7
    verify(sealed, key.public_key())
    with pytest.raises(SealError, match="does not verify"):
        verify(sealed, generate_key().public_key())
    for field, value in (("run", "run-other"), ("topic", topics.agent_inbox("a2")), ("seq", 8),
                         ("body", encode_message(Finish(run_id=RUN, reason="evil")))):
        tampered = sealed.__class__(**{**sealed.__dict__, field: value})
        with pytest.raises(SealError):
            verify(tampered, key.public_key())
    # Observers and tools still read sealed messages (without trusting them).
    assert decode_message(seal(key, run=RUN, topic=INBOX, seq=1, body=body)) == Finish(run_id=RUN, reason="done")


def test_malformed_envelopes_are_refused_with_a_reason() -> None:
    assert parse_sealed(encode_message(Finish(run_id=RUN, reason="x"))) is None  # plain message: not an envelope
    with pytest.raises(SealError, match="fields"):
        parse_sealed(b'{"type": "sealed", "body": "{}"}')
    with pytest.raises(SealError, match="seq"):
        parse_sealed(b'{"v":1,"type":"sealed","run":"r","topic":"t","seq":-1,"body":"{}","sig":"' + b"0" * 128 + b'"}')
    with pytest.raises(MessageError):
        decode_message(b'{"v":1,"type":"sealed","body":"{\\"v\\":1,\\"type\\":\\"sealed\\",\\"body\\":\\"{}\\"}"}')


def _gate(key_owner: Signer) -> ControlGate:
    return ControlGate(key_owner.key.public_key())


def test_the_gate_lets_through_only_signed_fresh_messages_for_this_agent_and_run() -> None:
    coordinator = Signer(generate_key())
    gate = _gate(coordinator)
    finish = encode_message(Finish(run_id=RUN, reason="done"))
    joined = {"joined_run": RUN, "joining_run": RUN, "join_nonce": "n1"}

    assert gate.admit(INBOX, finish, **joined) is None  # unsigned
    assert gate.admit(INBOX, Signer(generate_key()).seal(RUN, INBOX, finish), **joined) is None  # foreign key
    assert gate.admit(INBOX, coordinator.seal(RUN, topics.agent_inbox("a2"), finish), **joined) is None  # a2's
    other_run = encode_message(Finish(run_id="run-old", reason="done"))
    assert gate.admit(INBOX, coordinator.seal("run-old", INBOX, other_run), **joined) is None  # another run
    assert gate.admit(INBOX, coordinator.seal(RUN, INBOX, other_run), **joined) is None  # inner run differs
    assert gate.admit(INBOX, coordinator.seal(RUN, INBOX, finish), joined_run=None, joining_run=RUN,
                      join_nonce="n1") is None  # not joined yet: no Finish can concern it
    genuine = coordinator.seal(RUN, INBOX, finish)
    assert gate.admit(INBOX, genuine, **joined) == Finish(run_id=RUN, reason="done")
    assert gate.admit(INBOX, genuine, **joined) is None  # the same envelope again: a replay
    assert gate.dropped == 7


def test_join_answers_count_only_for_the_agents_own_join() -> None:
    coordinator = Signer(generate_key())
    gate = _gate(coordinator)
    accepted = JoinAccepted(run_id=RUN, agent_id="a1", backbone="tiny-3", bundle=REF, explanation="", nonce="n1")
    refused = encode_message(JoinRefused(agent_id="a1", reason="forged join for a1 refused", nonce="evil"))
    # A refusal caused by someone else's forged join (other nonce) must not stop the real agent.
    assert gate.admit(INBOX, coordinator.seal(RUN, INBOX, refused), joined_run=RUN, joining_run=RUN,
                      join_nonce="n1") is None
    assert gate.admit(INBOX, coordinator.seal(RUN, INBOX, encode_message(accepted)), joined_run=None,
                      joining_run=RUN, join_nonce="n1") == accepted


def test_status_of_any_run_passes_but_never_twice() -> None:
    coordinator = Signer(generate_key())
    gate = _gate(coordinator)
    status = encode_message(CoordStatus(state="online", run_id="run-new"))
    topic = topics.coord_status()
    first = coordinator.seal("run-new", topic, status)
    assert gate.admit(topic, first, joined_run=None, joining_run=None, join_nonce=None) is not None
    assert gate.admit(topic, first, joined_run=None, joining_run=None, join_nonce=None) is None


def test_insecure_gate_skips_only_the_signature_check() -> None:
    gate = ControlGate(None)
    stranger = Signer(generate_key())
    ack = encode_message(UpdateAck(round=1, nonce="x", accepted=True))
    assert gate.admit(INBOX, stranger.seal(RUN, INBOX, ack), joined_run=RUN, joining_run=RUN,
                      join_nonce=None) is not None
    assert gate.admit(INBOX, ack, joined_run=RUN, joining_run=RUN, join_nonce=None) is None  # still never plain
    assert gate.admit(INBOX, stranger.seal("other", INBOX, ack), joined_run=RUN, joining_run=RUN,
                      join_nonce=None) is None


def test_key_files_are_private_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "run-key"
    key = write_key_pair(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert public_key_hex(load_private_key(path).public_key()) == public_key_hex(key.public_key())
    assert public_key_hex(load_public_key(public_path(path))) == public_key_hex(key.public_key())
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_private_key(path)
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.pub")


def test_join_token_proof_binds_token_run_and_request() -> None:
    token = b"0123456789abcdef-secret"
    policy = AdmissionPolicy(frozenset({"a1", "a2"}), token)
    request = _join()
    good = request.model_copy(update={"proof": join_proof(token, RUN, request)})
    assert policy.refusal(good, RUN) is None
    assert "requires a join token" in str(policy.refusal(request, RUN))
    wrong_token = request.model_copy(update={"proof": join_proof(b"another-token-0000", RUN, request)})
    assert "does not match" in str(policy.refusal(wrong_token, RUN))
    assert "does not match" in str(policy.refusal(good, "run-other"))  # replayed into another run
    inflated = good.model_copy(update={"n_train": 10**9})  # proof copied onto a changed request
    assert "does not match" in str(policy.refusal(inflated, RUN))
    assert "allow-list" in str(AdmissionPolicy(frozenset({"a1"})).refusal(_join("intruder"), RUN))
    assert AdmissionPolicy().is_open and not policy.is_open


def test_reports_must_be_signed_with_the_key_the_agent_joined_with() -> None:
    agent = Signer(generate_key())
    topic = topics.agent_report("a1")
    body = b'{"any": "report"}'
    assert authentic_body(agent.public_hex, topic, agent.seal(RUN, topic, body), RUN) == body
    assert authentic_body(None, topic, body, RUN) == body  # joined without a key: nothing to check against
    with pytest.raises(SealError, match="unsigned"):
        authentic_body(agent.public_hex, topic, body, RUN)
    with pytest.raises(SealError, match="does not verify"):
        authentic_body(agent.public_hex, topic, Signer(generate_key()).seal(RUN, topic, body), RUN)
    with pytest.raises(MessageError, match="replayed"):
        authentic_body(agent.public_hex, topic, agent.seal("run-old", topic, body), RUN)


def test_provision_writes_the_run_key_apart_and_private(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from coordinator.cli import app

    result = CliRunner().invoke(app, ["provision", "--out", str(tmp_path / "sec"), "--agent", "a1",
                                      "--tls-port", "18883"])
    assert result.exit_code == 0, result.output
    key = tmp_path / "sec" / "run-key" / "run-key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in key.parent.iterdir()) == ["run-key", "run-key.pub"]  # nothing else beside it
    assert "--signing-key" in result.output and "--coordinator-key" in result.output
    signer = Signer(load_private_key(key))
    sealed = parse_sealed(signer.seal(RUN, INBOX, encode_message(Finish(run_id=RUN, reason="x"))))
    assert sealed is not None
    verify(sealed, load_public_key(public_path(key)))
    again = CliRunner().invoke(app, ["provision", "--out", str(tmp_path / "sec"), "--agent", "a1", "--agent", "a2",
                                     "--tls-port", "18883"])
    assert again.exit_code == 0, again.output
    assert public_key_hex(load_private_key(key).public_key()) == signer.public_hex  # devices keep trusting it


def test_an_agent_without_a_coordinator_key_refuses_to_start(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edge_agent.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi", "label": "positive"}\n')
    result = CliRunner().invoke(app, ["join", "--broker", "127.0.0.1:1", "--id", "a1", "--data", str(data)])
    assert result.exit_code == 2 and "no coordinator key" in result.output and "--coordinator-key" in result.output
    token = tmp_path / "token"
    token.write_text("x" * 40)
    token.chmod(0o644)
    result = CliRunner().invoke(app, ["join", "--broker", "127.0.0.1:1", "--id", "a1", "--data", str(data),
                                      "--insecure-no-verify", "--join-token-file", str(token)])
    assert result.exit_code == 2 and "chmod 600" in result.output
