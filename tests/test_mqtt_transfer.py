"""Blob transfer and endpoint behaviour through a real mosquitto on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from coordinator.broker import MosquittoBroker, parse_broker_address
from protocols import topics
from protocols.chunks import BlobAssembler, BlobRef, decode_chunk, encode_chunk, split_blob
from protocols.errors import BlobFetchTimeout, BrokerUnavailable, ChunkError, MessageError, PayloadTooLarge
from protocols.messages import AgentStatus, UpdateReport, decode_message, encode_message
from protocols.mqtt import Inbound, MqttEndpoint, clear_blob, fetch_blob, publish_blob
from tests.conftest import EndpointFactory


def _no_resend(indices: list[int]) -> None:
    raise AssertionError(f"unexpected resend request for {indices}")


def _get_on(endpoint: MqttEndpoint, topic: str, timeout: float = 5.0) -> Inbound:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        item = endpoint.get(timeout=left)
        if item is not None and item.topic == topic:
            return item
    raise AssertionError(f"nothing arrived on {topic} within {timeout} s")


def _topic(name: str) -> str:
    return f"test/{name}/{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------------ (1) fetch


def test_retained_blob_is_fetched_and_verified(make_endpoint: EndpointFactory) -> None:
    coordinator, agent = make_endpoint(), make_endpoint()
    data = os.urandom(1_500_000)
    ref = publish_blob(coordinator, data, wait_timeout=10)
    assert ref == BlobRef.from_blob(data) and ref.chunks == 6

    inbox = _topic("inbox")
    agent.subscribe(inbox)
    coordinator.publish(inbox, b"assignment")  # must not be swallowed by fetch_blob
    started = time.monotonic()
    assert fetch_blob(agent, ref, request_resend=_no_resend, timeout=10) == data
    assert time.monotonic() - started < 5
    assert _get_on(agent, inbox).payload == b"assignment"

    # fetch_blob unsubscribed: a later chunk publish reaches neither the route nor the main queue
    coordinator.publish(topics.blob_chunk(ref.sha256, 0), encode_chunk(split_blob(data)[0]), retain=False)
    time.sleep(0.3)
    assert agent.drain() == []

    # cleared blobs are gone for late subscribers
    clear_blob(coordinator, ref, wait_timeout=5)
    late = make_endpoint()
    with pytest.raises(BlobFetchTimeout) as info:
        fetch_blob(late, ref, request_resend=lambda _: None, timeout=0.8, resend_after=0.3)
    assert info.value.missing == list(range(6))


def test_update_upload_on_one_topic_is_reassembled(make_endpoint: EndpointFactory) -> None:
    agent, coordinator = make_endpoint(), make_endpoint()
    coordinator.subscribe(topics.update_filter())
    data = os.urandom(700_000)
    ref = publish_blob(agent, data, retain=False, topic=topics.agent_update_chunk("a7", 2), wait_timeout=10)
    assembler = BlobAssembler(ref)
    while not assembler.complete:
        item = coordinator.get(timeout=5)
        assert item is not None
        assert topics.parse_agent_topic(item.topic) == ("a7", "update", "2")
        assembler.add(decode_chunk(item.payload))
    assert assembler.assemble() == data


# ------------------------------------------------------------------------ (2) corruption, loss


def test_corrupt_chunk_is_detected_and_requested_again(make_endpoint: EndpointFactory) -> None:
    coordinator, agent = make_endpoint(), make_endpoint()
    data = os.urandom(1_100_000)
    ref = publish_blob(coordinator, data, wait_timeout=10)
    bad = bytearray(encode_chunk(split_blob(data)[2]))
    bad[-100] ^= 0xFF
    with pytest.raises(ChunkError):
        decode_chunk(bytes(bad))
    assert coordinator.wait_published(
        coordinator.publish(topics.blob_chunk(ref.sha256, 2), bytes(bad), retain=True), 5
    )

    requested: list[list[int]] = []

    def resend(indices: list[int]) -> None:  # what the coordinator does on a ResendRequest
        requested.append(indices)
        publish_blob(coordinator, data, indices=indices)

    assert fetch_blob(agent, ref, request_resend=resend, timeout=10, resend_after=30) == data
    assert requested == [[2]]


def test_missing_chunk_is_requested_after_a_stall(make_endpoint: EndpointFactory) -> None:
    coordinator, agent = make_endpoint(), make_endpoint()
    data = os.urandom(900_000)
    ref = publish_blob(coordinator, data, wait_timeout=10)
    coordinator.wait_published(coordinator.publish(topics.blob_chunk(ref.sha256, 1), b"", retain=True), 5)
    requested: list[list[int]] = []

    def resend(indices: list[int]) -> None:
        requested.append(indices)
        publish_blob(coordinator, data, indices=indices)

    assert fetch_blob(agent, ref, request_resend=resend, timeout=10, resend_after=0.3) == data
    assert requested == [[1]]


def test_timeout_names_the_missing_chunks(make_endpoint: EndpointFactory) -> None:
    coordinator, agent = make_endpoint(), make_endpoint()
    data = os.urandom(800_000)
    ref = publish_blob(coordinator, data, wait_timeout=10)
    coordinator.wait_published(coordinator.publish(topics.blob_chunk(ref.sha256, 3), b"", retain=True), 5)
    requested: list[list[int]] = []
    started = time.monotonic()
    with pytest.raises(BlobFetchTimeout, match=r"1 of 4 chunks missing \(indices \[3\]\)") as info:
        fetch_blob(agent, ref, request_resend=requested.append, timeout=1.0, resend_after=0.3)
    assert 0.9 < time.monotonic() - started < 3
    assert info.value.missing == [3]
    assert isinstance(info.value, TimeoutError)
    assert requested and all(r == [3] for r in requested)
    assert len(requested) <= 4  # rate-limited to once per resend_after window


# ----------------------------------------------------------------------------- (3) duplicates


def test_duplicate_deliveries_are_harmless(make_endpoint: EndpointFactory) -> None:
    coordinator, agent = make_endpoint(), make_endpoint()
    data = os.urandom(1_000_000)
    ref = publish_blob(coordinator, data, wait_timeout=10)
    # overlapping subscriptions make the broker deliver chunks 0 and 1 twice (reference §9.11)
    agent.subscribe(topics.blob_filter(ref.sha256))
    agent.subscribe(topics.blob_chunk(ref.sha256, 0))
    agent.subscribe(topics.blob_chunk(ref.sha256, 1))
    publish_blob(coordinator, data, indices=[3], retain=False)  # and a plain re-send of chunk 3
    assembler = BlobAssembler(ref)
    outcomes: list[bool] = []
    deadline = time.monotonic() + 5
    while len(outcomes) < ref.chunks + 3 and time.monotonic() < deadline:
        item = agent.get(timeout=1)
        if item is not None:
            outcomes.append(assembler.add(decode_chunk(item.payload)))
    assert outcomes.count(True) == ref.chunks
    assert outcomes.count(False) >= 3
    assert assembler.received_bytes == len(data)
    assert assembler.assemble() == data


def test_fetch_blob_tolerates_duplicates_during_download(make_endpoint: EndpointFactory) -> None:
    coordinator, agent = make_endpoint(), make_endpoint()
    data = os.urandom(1_300_000)
    ref = publish_blob(coordinator, data, wait_timeout=10)
    stop = threading.Event()

    def spam() -> None:
        while not stop.is_set():
            publish_blob(coordinator, data, indices=[0, 1], retain=False)
            time.sleep(0.002)

    spammer = threading.Thread(target=spam, daemon=True)
    spammer.start()
    try:
        assert fetch_blob(agent, ref, request_resend=_no_resend, timeout=10) == data
    finally:
        stop.set()
        spammer.join(5)


# ------------------------------------------------------------------- (4) oversize and malformed


def test_oversize_payload_is_refused_before_sending(make_endpoint: EndpointFactory) -> None:
    topic = _topic("oversize")
    sender, receiver = make_endpoint(max_payload=4096), make_endpoint()
    receiver.subscribe(topic)
    with pytest.raises(PayloadTooLarge, match=r"4097 bytes .* exceeds the 4096-byte limit") as info:
        sender.publish(topic, b"x" * 4097)
    assert (info.value.size, info.value.limit) == (4097, 4096)
    with pytest.raises(PayloadTooLarge):
        publish_blob(sender, os.urandom(20_000), chunk_size=8192)
    assert sender.wait_published(sender.publish(topic, b"x" * 4096), 5)
    assert _get_on(receiver, topic).payload == b"x" * 4096  # the oversize one never arrived first
    time.sleep(0.2)
    assert receiver.drain() == []
    assert sender.connected


def test_malformed_message_on_agent_topic_is_a_message_error(make_endpoint: EndpointFactory) -> None:
    agent, coordinator = make_endpoint(), make_endpoint()
    agent_id = f"agent-{uuid.uuid4().hex[:8]}"
    coordinator.subscribe(topics.agents_filter("report"))
    coordinator.subscribe(topics.agents_filter("status"))
    agent.publish(topics.agent_report(agent_id), b'{"v": 1, "type": "update", "run_id": ')
    agent.publish(topics.agent_report(agent_id), encode_message(AgentStatus(agent_id=agent_id, state="idle")))
    agent.publish(topics.agent_status(agent_id), encode_message(AgentStatus(agent_id=agent_id, state="idle")))

    first = _get_on(coordinator, topics.agent_report(agent_id))
    assert topics.parse_agent_topic(first.topic) == (agent_id, "report", None)
    with pytest.raises(MessageError, match="not UTF-8 JSON"):
        decode_message(first.payload, UpdateReport)
    second = _get_on(coordinator, topics.agent_report(agent_id))
    with pytest.raises(MessageError, match="unexpected message type 'agent_status'"):
        decode_message(second.payload, UpdateReport)
    status = _get_on(coordinator, topics.agent_status(agent_id))
    assert decode_message(status.payload, AgentStatus).state == "idle"


def test_unreachable_broker_is_reported_clearly(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path)
    broker.start()
    host, port = broker.host, broker.port
    broker.stop()
    endpoint = MqttEndpoint("nobody", host, port)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=f"{host}:{port}.*check that the broker is running"):
        endpoint.start(timeout=3)
    assert time.monotonic() - started < 3
    endpoint.stop()


# ----------------------------------------------------------------------------- (5) restarts


@pytest.mark.parametrize("how", ["graceful", "crash"])
def test_subscriptions_come_back_after_broker_restart(
    fresh_mosquitto: MosquittoBroker, make_endpoint: EndpointFactory, how: str
) -> None:
    topic = _topic("restart")
    sessions: list[bool] = []
    connects = threading.Semaphore(0)

    def on_connect(session_present: bool) -> None:
        sessions.append(session_present)
        connects.release()

    subscriber = make_endpoint(broker=fresh_mosquitto, on_connect=on_connect)
    publisher = make_endpoint(broker=fresh_mosquitto)
    assert connects.acquire(timeout=1)
    subscriber.subscribe(topic)

    if how == "graceful":
        fresh_mosquitto.stop()  # SIGTERM: the session DB is saved
    else:
        fresh_mosquitto.kill()  # SIGKILL: sessions and subscriptions are gone (reference §6.2)
    offline_mid = publisher.publish(topic + "/offline", b"queued while down")
    fresh_mosquitto.start()

    assert connects.acquire(timeout=15), "subscriber did not reconnect"
    assert publisher.wait_published(offline_mid, 15), "message queued while offline was not acknowledged"
    assert sessions == ([False, True] if how == "graceful" else [False, False])
    assert subscriber.wait_connected(5)  # waits for the resubscription, not just the CONNACK
    publisher.publish(topic, b"after restart")
    assert _get_on(subscriber, topic, timeout=5).payload == b"after restart"


_DYING_AGENT = """
import sys, time
from protocols.mqtt import MqttEndpoint, Will
host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ep = MqttEndpoint("dying-agent", host, port, keepalive=30, will=Will(topic, b"lost", retain=True))
ep.start()
ep.wait_published(ep.publish(topic, b"online", retain=True), 5)
print("ready", flush=True)
time.sleep(60)
"""


def test_last_will_is_published_when_an_agent_dies(
    mosquitto: MosquittoBroker, make_endpoint: EndpointFactory
) -> None:
    status = _topic("status")
    observer = make_endpoint()
    observer.subscribe(status)
    proc = subprocess.Popen(
        [sys.executable, "-c", _DYING_AGENT, mosquitto.host, str(mosquitto.port), status],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        assert _get_on(observer, status).payload == b"online"
        os.kill(proc.pid, signal.SIGKILL)
        will = _get_on(observer, status, timeout=5)
        assert will.payload == b"lost"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
    late = make_endpoint()
    late.subscribe(status)
    retained = _get_on(late, status)
    assert (retained.payload, retained.retain) == (b"lost", True)


def test_parse_broker_address() -> None:
    assert parse_broker_address("127.0.0.1:1883") == ("127.0.0.1", 1883)
    assert parse_broker_address("broker.lan:8883") == ("broker.lan", 8883)
    assert parse_broker_address("[::1]:1884") == ("::1", 1884)
    for bad in ("127.0.0.1", ":1883", "host:0", "host:70000", "host:x", "a b:1"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_broker_address(bad)


def test_broker_config_and_restart_keep_the_port(fresh_mosquitto: MosquittoBroker) -> None:
    conf = fresh_mosquitto.config_path.read_text()
    for line in (
        f"listener {fresh_mosquitto.port} 127.0.0.1",
        "set_tcp_nodelay true",
        "max_packet_size 2097152",
        "max_inflight_messages 4",
        "max_queued_messages 20000",
        "persistence true",
        f"log_dest file {fresh_mosquitto.log_path}",
    ):
        assert line in conf.splitlines()
    port, pid = fresh_mosquitto.port, fresh_mosquitto.pid
    fresh_mosquitto.restart()
    assert fresh_mosquitto.port == port and fresh_mosquitto.pid != pid and fresh_mosquitto.running
    assert fresh_mosquitto.address == f"127.0.0.1:{port}"
    fresh_mosquitto.stop()
    fresh_mosquitto.stop()  # idempotent
    assert not fresh_mosquitto.running


def test_client_sockets_disable_nagle(make_endpoint: EndpointFactory) -> None:
    # Without TCP_NODELAY on the client sockets a 10 KB request/reply takes ~44 ms instead of ~0.4 ms
    # (reference §5.2). Checked as a socket option, not as a timing, so a loaded CI machine cannot flake it.
    endpoint = make_endpoint()
    sock = endpoint._client.socket()
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
