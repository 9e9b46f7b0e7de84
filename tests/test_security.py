"""Against a real mosquitto running the provisioned configuration: an agent can neither write another agent's
topics nor read another agent's inbox, no one connects without a password, and TLS verifies the server."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.broker import MosquittoBroker
from coordinator.provision import COORDINATOR_USER, Provisioned, provision
from protocols import topics
from protocols.errors import BrokerUnavailable
from protocols.mqtt import MqttEndpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MosquittoBroker, Provisioned]]:
    tmp = tmp_path_factory.mktemp("secure")
    creds = provision(tmp / "security", ["a1", "a2"], tls_port=_free_port())
    with MosquittoBroker(tmp / "broker", extra=creds.config_lines) as broker:
        yield broker, creds


def _client(broker: MosquittoBroker, creds: Provisioned, user: str, **kwargs: object) -> MqttEndpoint:
    endpoint = MqttEndpoint(user, broker.host, broker.port, username=user, password=creds.passwords[user],
                            clean_start=True, **kwargs)  # type: ignore[arg-type]
    endpoint.start(timeout=5)
    return endpoint


def test_agent_cannot_write_another_agents_topics(secured: tuple[MosquittoBroker, Provisioned]) -> None:
    broker, creds = secured
    coordinator = _client(broker, creds, COORDINATOR_USER)
    a1 = _client(broker, creds, "a1")
    try:
        coordinator.subscribe(topics.agents_filter("report"))
        forged = a1.publish(topics.agent_report("a2"), b'{"forged": true}')
        own = a1.publish(topics.agent_report("a1"), b'{"own": true}')
        assert not a1.wait_published(forged, 5), "the broker accepted a publish on another agent's topic"
        assert a1.wait_published(own, 5)
        received = [coordinator.get(timeout=2), coordinator.get(timeout=1)]
        topics_seen = [m.topic for m in received if m is not None]
        assert topics_seen == [topics.agent_report("a1")], topics_seen
        assert a1.connected  # v5: the forged publish is refused with reason 135, the client stays connected
    finally:
        a1.stop()
        coordinator.stop()


def test_agent_beats_on_its_own_heartbeat_topic_only(secured: tuple[MosquittoBroker, Provisioned]) -> None:
    """The provisioned ACL lets each agent publish its heartbeat (liveness) and refuses one for another agent."""
    broker, creds = secured
    coordinator = _client(broker, creds, COORDINATOR_USER)
    a1 = _client(broker, creds, "a1")
    try:
        coordinator.subscribe(topics.agents_filter("heartbeat"))
        forged = a1.publish(topics.agent_heartbeat("a2"), b"beat")
        own = a1.publish(topics.agent_heartbeat("a1"), b"beat")
        assert not a1.wait_published(forged, 5), "the broker accepted a heartbeat for another agent"
        assert a1.wait_published(own, 5), "the broker refused an agent's own heartbeat: re-provision the ACL"
        received = [coordinator.get(timeout=2), coordinator.get(timeout=1)]
        assert [m.topic for m in received if m is not None] == [topics.agent_heartbeat("a1")]
    finally:
        a1.stop()
        coordinator.stop()


def test_agent_cannot_read_another_agents_inbox(secured: tuple[MosquittoBroker, Provisioned]) -> None:
    broker, creds = secured
    coordinator = _client(broker, creds, COORDINATOR_USER)
    a1, a2 = _client(broker, creds, "a1"), _client(broker, creds, "a2")
    try:
        a1.subscribe(topics.agent_inbox("a2"))  # SUBACK may grant it; delivery is what the ACL filters
        a1.subscribe("fl/v1/agents/+/inbox")
        a2.subscribe(topics.agent_inbox("a2"))
        coordinator.wait_published(coordinator.publish(topics.agent_inbox("a2"), b"for a2 only"), 5)
        got = a2.get(timeout=5)
        assert got is not None and got.payload == b"for a2 only"
        time.sleep(0.5)
        assert a1.drain() == []
    finally:
        for endpoint in (a1, a2, coordinator):
            endpoint.stop()


def test_wrong_password_and_anonymous_are_refused(secured: tuple[MosquittoBroker, Provisioned]) -> None:
    broker, _ = secured
    for username, password in (("a1", "wrong"), (None, None)):
        endpoint = MqttEndpoint("intruder", broker.host, broker.port, username=username, password=password)
        with pytest.raises(BrokerUnavailable):
            endpoint.start(timeout=3)
        endpoint.stop()


def test_tls_listener_verifies_against_the_provisioned_ca(secured: tuple[MosquittoBroker, Provisioned],
                                                          tmp_path: Path) -> None:
    _broker, creds = secured
    trusted = ssl.create_default_context(cafile=str(creds.ca_cert))
    with socket.create_connection(("127.0.0.1", creds.tls_port), timeout=5) as raw, \
            trusted.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    other = provision(tmp_path / "other-ca", [], tls_port=1)
    untrusted = ssl.create_default_context(cafile=str(other.ca_cert))
    with socket.create_connection(("127.0.0.1", creds.tls_port), timeout=5) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        untrusted.wrap_socket(raw, server_hostname="127.0.0.1")
    endpoint = MqttEndpoint("a1", "127.0.0.1", creds.tls_port, username="a1", password=creds.passwords["a1"],
                            tls_ca=str(creds.ca_cert), clean_start=True)
    endpoint.start(timeout=5)
    assert endpoint.connected
    endpoint.stop()
