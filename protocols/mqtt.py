"""A thin, thread-safe paho-mqtt 2.x endpoint plus chunked blob transfer over it.

The wrapper exists to encode the traps measured in reference/mqtt.md §9 once: TCP_NODELAY on every
(re)connect, resubscribe on every connect (broker amnesia), size checks before publish (paho ignores
the server's MaximumPacketSize and loops forever), publish completion via on_publish (paho's
wait_for_publish raises for messages queued while offline), disconnect before loop_stop, and
callbacks that only enqueue (a blocked network thread gets the client declared dead).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocols.brokers import BrokerAddress
from protocols.chunk_spool import ChunkSpool
from protocols.chunks import (
    CHUNK_SIZE,
    BlobAssembler,
    BlobRef,
    Chunk,
    ChunkError,
    decode_chunk,
    encode_chunk,
    split_blob,
)
from protocols.errors import (
    BlobFetchTimeout,
    BlobIntegrityError,
    BrokerUnavailable,
    PayloadTooLarge,
    ProtocolError,
    TopicError,
)
from protocols.topics import blob_chunk, blob_filter, parse_blob_topic

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 1024 * 1024
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 1, 8  # paho's reconnect backoff
_MAX_TOPIC_BYTES = 65535


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Will:
    """Last will, sent by the broker if the connection dies without a DISCONNECT.

    A delay lets a Wi-Fi blip that ends in a reconnect pass without being counted as a dropout; it
    only works if the session expiry is at least as long (reference §9.20).
    """

    topic: str
    payload: bytes
    retain: bool = True
    delay_seconds: int = 0


def _check_topic(topic: str) -> None:
    if not isinstance(topic, str) or not topic:
        raise TopicError(f"publish topic {topic!r} must be a non-empty str")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise TopicError(
            f"publish topic {topic!r} contains '+', '#' or NUL; wildcards are only valid in subscriptions "
            "and NUL makes the broker drop the connection"
        )
    if len(topic.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise TopicError(f"topic of {len(topic)} characters exceeds the MQTT limit of 65535 bytes")


def _check_filter(topic_filter: str) -> None:
    if not isinstance(topic_filter, str) or not topic_filter or "\x00" in topic_filter:
        raise TopicError(f"subscription filter {topic_filter!r} must be a non-empty str without NUL")


class MqttEndpoint:
    """One MQTT v5 client with a background network thread and a queue of inbound messages.

    ``failover`` names further nodes of the same broker cluster (protocols/brokers.py): the first connect takes the
    first node that answers, and whenever a reconnect cannot reach the current node the client moves on to the next
    one (round robin). Credentials and TLS settings apply to every node alike. Subscriptions are restored on every
    connect and unacknowledged QoS 1 publishes are sent again by paho, so a node's death costs a reconnect, not data
    (what a dead node held for this client while it was away is lost: the protocol re-asks for it).
    """

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        clean_start: bool = False,
        session_expiry: int = 3600,
        keepalive: int = 30,
        will: Will | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        on_connect: Callable[[bool], None] | None = None,
        failover: Sequence[BrokerAddress] = (),
    ) -> None:
        self._client_id = client_id
        self._brokers = [BrokerAddress(host, int(port)), *failover]
        self._current = 0  # index into _brokers; changed only by start() and the network thread
        self._failovers = 0
        self._failed_since_connect = 0  # failed connect attempts since the last CONNACK (network thread only)
        self._clean_start = clean_start
        self._session_expiry = int(session_expiry)
        self._keepalive = int(keepalive)
        self._max_payload = int(max_payload)
        self._user_on_connect = on_connect
        self._connect_listeners: list[Callable[[bool], None]] = []

        self._lock = threading.Lock()
        self._acks = threading.Condition(self._lock)
        self._subs: dict[str, int] = {}
        # Filters whose retained messages must not be sent again when a reconnect restores them while the
        # broker kept the session (MQTT 5 retain handling 1): a resumed blob download then gets only what
        # it has not received, not every retained chunk a second time.
        self._no_retained_on_restore: set[str] = set()
        # Per message id: how many packets were handed to paho and how many were acknowledged.
        # Counting (instead of a set) stays correct when paho reuses a message id.
        self._issued: dict[int, int] = {}
        self._acked: dict[int, int] = {}
        self._failed: dict[int, str] = {}
        self._inbox: queue.Queue[Inbound] = queue.Queue()
        # _link_up: CONNACK received; _connected: additionally every remembered subscription is
        # back (SUBACK), so a message published by anyone after wait_connected() cannot be missed.
        self._link_up = threading.Event()
        self._connected = threading.Event()
        self._restore_mid: int | None = None
        self._first_connack = threading.Event()
        self._connack_error: str | None = None
        self._net_thread: int | None = None
        self._started = False
        self._stopped = False

        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        if username is not None:
            client.username_pw_set(username, password)
        if tls_ca is not None:
            client.tls_set(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key)  # cert/key: client certificates
        elif tls_cert is not None:
            raise ValueError("a client certificate needs TLS: give the broker's CA certificate (tls_ca) too")
        client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
        if will is not None:
            _check_topic(will.topic)
            will_props: Properties | None = None
            if will.delay_seconds > 0:
                will_props = Properties(PacketTypes.WILLMESSAGE)
                will_props.WillDelayInterval = int(will.delay_seconds)
            client.will_set(will.topic, will.payload, qos=1, retain=will.retain, properties=will_props)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        self._client = client

    # ----------------------------------------------------------------------------------- lifecycle

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def address(self) -> str:
        """The broker node this client uses (or tries) now."""
        return str(self._brokers[self._current])

    @property
    def failovers(self) -> int:
        """How often this client moved to another cluster node because its node could not be reached."""
        return self._failovers

    @property
    def connected(self) -> bool:
        """True once connected and all subscriptions are re-established."""
        return self._connected.is_set()

    @property
    def max_payload(self) -> int:
        return self._max_payload

    def start(self, timeout: float = 10.0) -> None:
        """Connect and start the network thread; fail fast if the broker is unreachable or refuses us."""
        if self._started:
            raise RuntimeError(f"MqttEndpoint {self._client_id!r} was already started; create a new one")
        self._started = True
        failures: list[str] = []
        for index, broker in enumerate(self._brokers):
            try:
                self._client.connect(
                    broker.host,
                    broker.port,
                    keepalive=self._keepalive,
                    clean_start=self._clean_start,
                    properties=self._connect_properties(),
                )
            except OSError as exc:
                failures.append(f"{broker}: {exc}")
                continue
            self._current = index
            if failures:
                log.warning("MQTT %s: unreachable %s; using %s", self._client_id, "; ".join(failures), broker)
            break
        else:
            self._stopped = True
            raise BrokerUnavailable(
                f"cannot connect to the MQTT broker at {'; '.join(failures)}; check that the broker is "
                "running and that host/port (and TLS settings) are right"
            )
        self._client.loop_start()
        if not self._first_connack.wait(timeout):
            self.stop()
            raise BrokerUnavailable(
                f"no CONNACK from the MQTT broker at {self.address} within {timeout:g} s; check that the "
                "address really is an MQTT broker and that it is not overloaded"
            )
        if self._connack_error is not None:
            reason = self._connack_error
            self.stop()
            raise BrokerUnavailable(
                f"the MQTT broker at {self.address} refused client {self._client_id!r}: {reason}; check the "
                "username/password and that the client id is allowed"
            )
        self._connected.wait(timeout)  # subscriptions made before start() are active on return

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        return props

    def stop(self) -> None:
        """Disconnect cleanly (no last will is sent) and stop the network thread. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._connected.clear()
        self._link_up.clear()
        try:
            self._client.disconnect()  # first: otherwise loop_stop() waits ~1 s in select() (§9.2)
        finally:
            self._client.loop_stop()

    def add_connect_listener(self, listener: Callable[[bool], None]) -> None:
        """Also call ``listener(session_present)`` on every (re)connect, from the network thread: keep it fast."""
        self._connect_listeners.append(listener)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until connected with all subscriptions restored (see ``connected``)."""
        return self._connected.wait(timeout)

    def __enter__(self) -> MqttEndpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------------------------- subscribing

    def _on_network_thread(self) -> bool:
        return self._net_thread == threading.get_ident()

    def subscribe(self, topic_filter: str, qos: int = 1, *, timeout: float = 10.0) -> bool:
        """Subscribe now (if connected) and on every future connect.

        Waits for the SUBACK so that a message published right after this returns is not missed;
        returns False if none came within ``timeout`` (e.g. offline: the subscription is then made by
        the next connect). Never waits when called from a callback.
        """
        _check_filter(topic_filter)
        with self._lock:
            self._subs[topic_filter] = qos
            self._no_retained_on_restore.discard(topic_filter)
        mid, ok = self._send_subscribe([(topic_filter, SubscribeOptions(qos=qos))], timeout)
        if ok is False:
            with self._lock:
                self._subs.pop(topic_filter, None)
                reason = self._failed.get(mid, "refused")
            raise ProtocolError(
                f"the broker refused the subscription to {topic_filter!r}: {reason}; check the filter "
                "syntax and the ACL for this user"
            )
        return ok is True

    def subscribe_many(self, filters: list[str], qos: int = 1, *, timeout: float = 10.0) -> bool:
        """Subscribe to many filters in one SUBSCRIBE packet (one round trip, not one per filter).

        Their retained messages come now; a reconnect that finds the broker kept the session restores
        them without sending the retained messages again (retain handling 1). Returns False if offline or
        no SUBACK came within ``timeout``; the subscriptions are then made by the next connect.
        """
        for topic_filter in filters:
            _check_filter(topic_filter)
        if not filters:
            return True
        with self._lock:
            for topic_filter in filters:
                self._subs[topic_filter] = qos
                self._no_retained_on_restore.add(topic_filter)
        mid, ok = self._send_subscribe([(f, SubscribeOptions(qos=qos)) for f in filters], timeout)
        if ok is False:
            raise ProtocolError(
                f"the broker refused some of {len(filters)} subscriptions ({filters[0]!r}, ...): "
                f"{self._failed.get(mid, 'refused')}; check the ACL for this user"
            )
        return ok is True

    def _send_subscribe(self, request: list[tuple[str, SubscribeOptions]], timeout: float) -> tuple[int, bool | None]:
        """Send one SUBSCRIBE and wait for its SUBACK: (mid, True) granted, (mid, False) refused, (mid, None) not
        sent, not acknowledged within ``timeout``, or not waited for (offline, or on the network thread, where
        waiting would deadlock); the subscriptions are then made by the next connect."""
        if not self._link_up.is_set():
            return -1, None
        rc, mid = self._client.subscribe(request)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return -1, None
        self._track(mid)
        if self._on_network_thread():
            return mid, None
        return mid, self._wait_ack(mid, timeout)

    def unsubscribe(self, topic_filter: str | list[str], *, timeout: float = 5.0) -> None:
        """Forget one or many subscriptions (one packet); waits for the UNSUBACK so no late message follows."""
        filters = [topic_filter] if isinstance(topic_filter, str) else list(topic_filter)
        if not filters:
            return
        with self._lock:
            for f in filters:
                self._subs.pop(f, None)
                self._no_retained_on_restore.discard(f)
        if not self._link_up.is_set():
            return
        rc, mid = self._client.unsubscribe(filters if len(filters) > 1 else filters[0])
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._track(mid)
            if not self._on_network_thread():
                self._wait_ack(mid, timeout)

    @contextmanager
    def route(self, topic_filter: str) -> Iterator[queue.Queue[Inbound]]:
        """Divert messages matching ``topic_filter`` to a private queue while the block runs.

        Lets a helper such as ``fetch_blob`` consume its own messages without stealing or
        reordering anything on the main ``get()`` queue. One route per filter at a time.
        """
        _check_filter(topic_filter)
        private: queue.Queue[Inbound] = queue.Queue()

        def deliver(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
            self._enqueue(private, msg)

        self._client.message_callback_add(topic_filter, deliver)
        try:
            yield private
        finally:
            self._client.message_callback_remove(topic_filter)

    # --------------------------------------------------------------------------------- publishing

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_seconds: int | None = None,
    ) -> int:
        """Queue a message and return its message id (see ``wait_published``).

        Works while disconnected: paho keeps QoS 1 messages and sends them after the reconnect.
        """
        if self._stopped:
            raise RuntimeError(f"MqttEndpoint {self._client_id!r} is stopped; create a new one to publish")
        _check_topic(topic)
        payload = bytes(payload)
        if len(payload) > self._max_payload:
            raise PayloadTooLarge(
                f"payload of {len(payload)} bytes for {topic!r} exceeds the {self._max_payload}-byte limit; "
                f"send it as a chunked blob (publish_blob, {CHUNK_SIZE}-byte chunks) or raise max_payload "
                "together with the broker's max_packet_size",
                size=len(payload),
                limit=self._max_payload,
            )
        props: Properties | None = None
        if expiry_seconds is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry_seconds)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        queued_offline = info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not queued_offline:
            raise ProtocolError(
                f"paho could not queue the message for {topic!r}: {paho.error_string(info.rc)}"
                + ("; QoS 0 messages are dropped while offline, use QoS 1" if qos == 0 else "")
            )
        self._track(info.mid)
        return info.mid

    def wait_published(self, mid: int, timeout: float | None = None) -> bool:
        """True once the broker acknowledged ``mid`` with success; False on timeout or rejection."""
        return self._wait_ack(mid, timeout) is True

    # ---------------------------------------------------------------------------------- receiving

    def get(self, timeout: float | None = None) -> Inbound | None:
        """Next inbound message, or None after ``timeout`` seconds (None = wait forever)."""
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[Inbound]:
        """Everything currently queued, without waiting."""
        out: list[Inbound] = []
        while True:
            try:
                out.append(self._inbox.get_nowait())
            except queue.Empty:
                return out

    # ------------------------------------------------------------------------ ack bookkeeping

    def _track(self, mid: int) -> None:
        with self._acks:
            self._issued[mid] = self._issued.get(mid, 0) + 1

    def _ack(self, mid: int, failure: str | None) -> None:
        with self._acks:
            self._acked[mid] = self._acked.get(mid, 0) + 1
            if failure is None:
                self._failed.pop(mid, None)
            else:
                self._failed[mid] = failure
            self._acks.notify_all()

    def _wait_ack(self, mid: int, timeout: float | None) -> bool | None:
        """True: acknowledged OK; False: acknowledged with a failure reason; None: no ack yet."""
        with self._acks:
            done = self._acks.wait_for(
                lambda: mid in self._issued and self._acked.get(mid, 0) >= self._issued[mid], timeout
            )
            if not done:
                return None
            return mid not in self._failed

    # ------------------------------------------------------------------ paho callbacks (network thread)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            self._net_thread = threading.get_ident()
            if reason_code.is_failure:
                self._connack_error = str(reason_code)
                log.warning("MQTT broker %s refused %s: %s", self.address, self._client_id, reason_code)
                self._first_connack.set()
                return
            sock = client.socket()
            if isinstance(sock, socket.socket):
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # 88 ms -> 0.4 ms (§9.1)
                except OSError as exc:
                    log.debug("TCP_NODELAY not set: %s", exc)
            self._link_up.set()
            self._failed_since_connect = 0
            with self._lock:
                subs = list(self._subs.items())
            self._restore_mid = None
            if subs:
                keep = self._no_retained_on_restore
                rc, mid = client.subscribe(
                    [(f, SubscribeOptions(qos=q, retainHandling=1 if f in keep else 0)) for f, q in subs]
                )
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    self._track(mid)
                    self._restore_mid = mid
            if self._restore_mid is None:
                self._connected.set()
            self._connack_error = None
            self._first_connack.set()
            log.info(
                "MQTT %s connected to %s (session_present=%s)",
                self._client_id,
                self.address,
                flags.session_present,
            )
            for listener in ([self._user_on_connect] if self._user_on_connect else []) + self._connect_listeners:
                listener(bool(flags.session_present))
        except Exception:  # an exception here would kill paho's network thread
            log.exception("on_connect handler of %s failed", self._client_id)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        """A reconnect could not reach the current node: aim the next attempt at the next one (no I/O here).

        paho's loop calls this after a failed TCP/TLS connect and then waits its reconnect delay before trying
        again; ``connect_async`` only records the new address, so nothing blocks the network thread.
        """
        try:
            if len(self._brokers) < 2 or self._stopped:
                return
            failed = self._brokers[self._current]
            self._current = (self._current + 1) % len(self._brokers)
            self._failovers += 1
            self._failed_since_connect += 1
            if self._failed_since_connect < len(self._brokers):
                # A node not yet tried since the link was lost: try it after the shortest delay. Once every node
                # failed, paho's backoff grows again (1 to 8 s), so a fleet does not hammer a cluster that is down.
                client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
            nxt = self._brokers[self._current]
            log.warning("MQTT %s cannot reach %s; failing over to %s", self._client_id, failed, nxt)
            client.connect_async(
                nxt.host,
                nxt.port,
                keepalive=self._keepalive,
                clean_start=self._clean_start,
                properties=self._connect_properties(),
            )
        except Exception:  # an exception here would kill paho's network thread
            log.exception("failover of %s failed", self._client_id)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # paho may report one drop twice (§9.7): only the first transition is logged.
        self._connected.clear()
        if self._link_up.is_set():
            self._link_up.clear()
            if not self._stopped:
                log.warning("MQTT %s lost connection to %s: %s", self._client_id, self.address, reason_code)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._enqueue(self._inbox, msg)

    def _enqueue(self, target: queue.Queue[Inbound], msg: paho.MQTTMessage) -> None:
        try:
            target.put_nowait(Inbound(topic=msg.topic, payload=bytes(msg.payload), retain=bool(msg.retain)))
        except Exception:
            log.exception("dropping undecodable inbound message for %s", self._client_id)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        failure = str(reason_code) if reason_code.is_failure else None
        if failure is not None:
            log.warning("broker rejected publish mid=%d from %s: %s", mid, self._client_id, failure)
        self._ack(mid, failure)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failures = [str(rc) for rc in reason_codes if rc.is_failure]
        if failures:
            log.warning("broker refused subscription mid=%d of %s: %s", mid, self._client_id, failures)
        self._ack(mid, ", ".join(failures) if failures else None)
        if mid == self._restore_mid:
            self._restore_mid = None
            self._connected.set()

    def _on_unsubscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._ack(mid, None)


# ------------------------------------------------------------------------------ blob transfer


def publish_blob(
    endpoint: MqttEndpoint,
    data: bytes,
    *,
    retain: bool = True,
    chunk_size: int = CHUNK_SIZE,
    indices: Iterable[int] | None = None,
    topic: str | None = None,
    wait_timeout: float | None = None,
) -> BlobRef:
    """Publish ``data`` as chunk frames and return its address.

    By default each chunk goes retained to ``fl/v1/blobs/{sha}/{i}`` so late or rejoining receivers
    fetch it by subscribing. ``indices`` republishes only those chunks (answering a ResendRequest;
    out-of-range indices from a peer are ignored). ``topic`` sends every frame to one topic instead
    (agent update uploads; frames are self-describing). With ``wait_timeout`` the call returns only
    once the broker acknowledged every chunk, raising ``TimeoutError`` otherwise.
    """
    chunks = split_blob(data, chunk_size)
    ref = BlobRef(sha256=chunks[0].blob_sha, size=len(data), chunks=len(chunks))
    wanted = None if indices is None else {i for i in indices if isinstance(i, int) and 0 <= i < len(chunks)}
    mids = []
    for chunk in chunks:
        if wanted is not None and chunk.index not in wanted:
            continue
        target = topic if topic is not None else blob_chunk(ref.sha256, chunk.index)
        mids.append(endpoint.publish(target, encode_chunk(chunk), qos=1, retain=retain))
    if wait_timeout is not None:
        _wait_all(endpoint, mids, wait_timeout, f"chunks of blob {ref.sha256[:12]}")
    return ref


def clear_blob(endpoint: MqttEndpoint, ref: BlobRef, *, wait_timeout: float | None = None) -> None:
    """Remove a blob's retained chunks from the broker (empty retained payloads).

    With ``wait_timeout`` it returns only after the broker acknowledged every clear, so a
    subscriber arriving afterwards is guaranteed not to see the old chunks.
    """
    mids = [endpoint.publish(blob_chunk(ref.sha256, i), b"", qos=1, retain=True) for i in range(ref.chunks)]
    if wait_timeout is not None:
        _wait_all(endpoint, mids, wait_timeout, f"clears of blob {ref.sha256[:12]}")


def _wait_all(endpoint: MqttEndpoint, mids: list[int], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for mid in mids:
        if not endpoint.wait_published(mid, max(0.0, deadline - time.monotonic())):
            raise TimeoutError(
                f"broker did not acknowledge all {len(mids)} {what} within {timeout:g} s; check the broker "
                "connection, its max_packet_size and the ACL"
            )


def fetch_blob(
    endpoint: MqttEndpoint,
    ref: BlobRef,
    *,
    request_resend: Callable[[list[int]], None],
    timeout: float = 120.0,
    resend_after: float = 5.0,
    on_progress: Callable[[int, int], None] | None = None,
    spool: ChunkSpool | None = None,
) -> bytes:
    """Download and verify a retained blob, asking the publisher for damaged or missing chunks.

    Only the chunks still missing are subscribed to (exact topics, one SUBSCRIBE packet), so a download
    resumed after a restart does not pull the kept chunks again; a reconnect that finds the broker kept
    the session restores them without a second copy of the retained chunks (the broker sends what was
    queued or unacknowledged). With ``spool`` every verified chunk is also kept on disk and chunks kept
    by an earlier, interrupted attempt are reused after re-verifying their hashes.

    A corrupt chunk is re-requested at once; when no new chunk arrived for ``resend_after`` seconds the
    missing ones are re-requested and re-subscribed, which makes the broker redeliver those retained
    chunks (duplicates are harmless). The same index is asked for at most once per ``resend_after``
    window. Raises ``BlobFetchTimeout`` (a TimeoutError) naming the missing indices if the blob is not
    complete after ``timeout`` seconds; the spool keeps what arrived. ``on_progress(received, total)`` is
    called after every new chunk (bytes, kept ones included), e.g. to show a progress line.
    """
    topic_filter = blob_filter(ref.sha256)
    assembler = BlobAssembler(ref)
    if spool is not None:
        for kept in spool.load(ref):
            assembler.add(kept)
        if assembler.received_bytes:
            log.info("blob %s: resuming with %d of %d chunks (%d of %d bytes) kept from an earlier attempt",
                     ref.sha256[:12], ref.chunks - len(assembler.missing()), ref.chunks,
                     assembler.received_bytes, ref.size)
            if on_progress is not None:
                on_progress(assembler.received_bytes, ref.size)
    asked: dict[int, float] = {}
    start = time.monotonic()
    deadline = start + timeout
    last_progress = start
    subscribed: dict[str, None] = {}  # ordered set of the exact chunk topics subscribed to

    def ask(indices: list[int], now: float) -> None:
        fresh = [i for i in indices if now - asked.get(i, -1e18) >= resend_after]
        if fresh:
            for i in fresh:
                asked[i] = now
            log.info("blob %s: requesting %d chunks again: %s", ref.sha256[:12], len(fresh), fresh[:20])
            request_resend(fresh)

    def subscribe_missing() -> None:
        topics = [blob_chunk(ref.sha256, i) for i in assembler.missing()]
        subscribed.update(dict.fromkeys(topics))
        endpoint.subscribe_many(topics)  # (re-)subscribing sends those chunks' retained copies again

    with endpoint.route(topic_filter) as inbox:
        try:
            if not assembler.complete:
                subscribe_missing()
            while True:
                now = time.monotonic()
                if assembler.complete:
                    try:
                        data = assembler.assemble()
                    except BlobIntegrityError as exc:
                        log.warning("%s", exc)
                        if spool is not None:
                            spool.discard(ref.sha256)
                        asked.clear()
                        ask(list(range(ref.chunks)), now)
                        subscribe_missing()
                        last_progress = now
                        continue
                    if spool is not None:
                        spool.discard(ref.sha256)
                    return data
                if now >= deadline:
                    missing = assembler.missing()
                    raise BlobFetchTimeout(
                        f"blob {ref.sha256[:12]} incomplete after {timeout:g} s: {len(missing)} of "
                        f"{ref.chunks} chunks missing (indices {missing[:20]}"
                        f"{' ...' if len(missing) > 20 else ''}), {assembler.received_bytes} of {ref.size} "
                        "bytes received; check that the publisher is online and still serving this blob",
                        missing=missing,
                    )
                if now - last_progress >= resend_after:
                    ask(assembler.missing(), now)
                    subscribe_missing()
                    last_progress = time.monotonic()
                    continue
                wait = max(0.001, min(deadline, last_progress + resend_after) - now)
                try:
                    item = inbox.get(timeout=wait)
                except queue.Empty:
                    continue
                chunk = _accept_chunk(assembler, item, ask)
                if chunk is not None:
                    last_progress = time.monotonic()
                    if spool is not None:
                        spool.save(chunk)
                    if on_progress is not None:
                        on_progress(assembler.received_bytes, ref.size)
        finally:
            endpoint.unsubscribe(list(subscribed))


def _accept_chunk(
    assembler: BlobAssembler, item: Inbound, ask: Callable[[list[int], float], None]
) -> Chunk | None:
    """Feed one delivery to the assembler; the chunk if it was a new valid one."""
    if not item.payload:
        return None  # a cleared retained chunk
    try:
        _, topic_index = parse_blob_topic(item.topic)
    except TopicError:
        return None
    try:
        chunk = decode_chunk(item.payload)
        if chunk.index != topic_index:
            raise ChunkError(
                f"frame for chunk {chunk.index} arrived on the topic of chunk {topic_index}",
                index=topic_index,
                blob_sha=chunk.blob_sha,
            )
        return chunk if assembler.add(chunk) else None
    except ChunkError as exc:
        log.warning("bad chunk on %s: %s", item.topic, exc)
        if 0 <= topic_index < assembler.ref.chunks and not assembler.has(topic_index):
            ask([topic_index], time.monotonic())
        return None
