"""Synthetic edge agents for the scale benchmark: many real paho MQTT v5 clients in one process.

Each agent speaks the real fl/v1 protocol with the real message schemas, chunk frames and tensor codec:

    JoinRequest -> JoinAccepted -> (per round) Assignment -> fetch the weights blob (retained chunks, sha256)
    -> status "training" -> random update of exactly the assigned names and shapes -> status "uploading"
    -> update chunks + UpdateReport -> status "idle" -> UpdateAck ... -> Finish -> status "left"

It trains nothing and never downloads its bundle tar: the tensor shapes come from the bundle manifest on
the builder side (`--shapes`, written by `bench.scale`) and are checked against the weights it receives.
All clients of a process share one selector loop (paho's external-loop API), so a process holds hundreds
of agents on one thread. The loop stops when every agent got Finish or at `--time-limit`; the process then
prints one JSON object with per-agent latencies, its CPU time and its peak RSS.

    python -m bench.loadgen --port PORT --ids a0000:a0249 --shapes SHAPES.json --time-limit 600
"""

from __future__ import annotations

import argparse
import json
import secrets
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.common import cpu_seconds, peak_rss_mb
from protocols import topics
from protocols.chunks import BlobAssembler, ChunkError, decode_chunk, encode_chunk, split_blob
from protocols.errors import MessageError
from protocols.messages import (
    AgentStatus,
    Assignment,
    BlobRefModel,
    DeviceProfile,
    Finish,
    JoinAccepted,
    JoinRefused,
    JoinRequest,
    ResendRequest,
    RoundMetrics,
    UpdateAck,
    UpdateReport,
    decode_message,
    encode_message,
)
from protocols.tensors import decode_tensors, encode_tensors

HOST = "127.0.0.1"
PROFILE = DeviceProfile(ram_total_mb=4096, ram_available_mb=3072, cores=4, arch="x86_64", gflops=50.0,
                        disk_free_mb=10_000, backends=["ort"])


@dataclass
class RoundRecord:
    """One agent's view of one round (time.time() stamps)."""

    assigned: float
    weights: float = 0.0
    uploaded: float = 0.0
    acked: float = 0.0
    accepted: bool | None = None


@dataclass
class SyntheticAgent:
    agent_id: str
    client: paho.Client
    shapes: dict[str, tuple[int, ...]]
    rng: np.random.Generator
    connected_at: float = 0.0
    joined_at: float = 0.0
    run_id: str | None = None
    finished: bool = False
    error: str = ""
    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    assignment: Assignment | None = None
    assembler: BlobAssembler | None = None
    upload: tuple[int, bytes] | None = None  # (round, blob) kept for resend requests
    bytes_down: int = 0
    messages_in: int = 0
    joined_once: bool = False

    # --- outbound -----------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def status(self, state: str) -> None:
        message = AgentStatus.model_validate({"agent_id": self.agent_id, "state": state})
        self.publish(topics.agent_status(self.agent_id), encode_message(message), retain=True)

    def join(self) -> None:
        request = JoinRequest(agent_id=self.agent_id, nonce=secrets.token_hex(8), profile=PROFILE, n_train=96,
                              n_test=32)
        self.publish(topics.agent_join(self.agent_id), encode_message(request))
        self.status("online")

    # --- inbound ------------------------------------------------------------------------------------

    def on_message(self, msg: paho.MQTTMessage) -> None:
        self.messages_in += 1
        payload = bytes(msg.payload)
        if msg.topic.startswith(topics.PREFIX + "/blobs/"):
            self._on_chunk(payload)
            return
        if not payload:
            return
        try:
            message = decode_message(payload)
        except MessageError as exc:
            self.error = f"bad message on {msg.topic}: {exc}"
            return
        if isinstance(message, JoinAccepted):
            self.run_id, self.joined_at = message.run_id, time.time()  # the bundle is never fetched
        elif isinstance(message, JoinRefused):
            self.error, self.finished = f"refused: {message.reason}", True
        elif isinstance(message, Assignment):
            self._on_assignment(message)
        elif isinstance(message, UpdateAck):
            record = self.rounds.get(message.round)
            if record is not None and not record.acked:
                record.acked, record.accepted = time.time(), message.accepted
                if not message.accepted:
                    self.error = f"round {message.round} rejected: {message.reason}"
        elif isinstance(message, ResendRequest) and self.upload is not None:
            round_id, blob = self.upload
            for chunk in split_blob(blob):
                if chunk.index in message.indices:
                    self.publish(topics.agent_update_chunk(self.agent_id, round_id), encode_chunk(chunk))
        elif isinstance(message, Finish):
            self.status("left")
            self.finished = True

    def _on_assignment(self, a: Assignment) -> None:
        if a.run_id != self.run_id or a.round in self.rounds:
            return
        self.rounds[a.round] = RoundRecord(assigned=time.time())
        self.assignment = a
        self.assembler = BlobAssembler(a.weights.to_ref())
        self.client.subscribe(topics.blob_filter(a.weights.sha256), qos=1)

    def _on_chunk(self, payload: bytes) -> None:
        if not payload or self.assembler is None or self.assignment is None:
            return  # a cleared retained chunk, or one of a blob we are not fetching
        try:
            self.assembler.add(decode_chunk(payload))
        except ChunkError as exc:
            self.error = f"bad weights chunk: {exc}"
            return
        if not self.assembler.complete:
            return
        a, blob = self.assignment, self.assembler.assemble()
        self.assembler = self.assignment = None
        self.client.unsubscribe(topics.blob_filter(a.weights.sha256))
        self.bytes_down += len(blob)
        received = decode_tensors(blob)
        record = self.rounds[a.round]
        record.weights = time.time()
        self._train_and_upload(a, received)
        record.uploaded = time.time()

    def _train_and_upload(self, a: Assignment, received: dict[str, np.ndarray]) -> None:
        wrong = [n for n in a.upload_names if tuple(received[n].shape) != self.shapes.get(n)]
        if wrong:
            self.error = f"weights do not match the manifest shapes: {wrong[:3]}"
        self.status("training")
        update = {name: (received[name] + self.rng.normal(0.0, 1e-3, received[name].shape)).astype(np.float32)
                  for name in a.upload_names}
        self.status("uploading")
        blob = encode_tensors(update)
        chunks = split_blob(blob)
        for chunk in chunks:
            self.publish(topics.agent_update_chunk(self.agent_id, a.round), encode_chunk(chunk))
        self.upload = (a.round, blob)
        metrics = RoundMetrics(personal_accuracy=0.5, global_accuracy=None, n_test=32, n_global_test=0,
                               train_loss=1.0, train_seconds=0.0, eval_seconds=0.0, peak_rss_mb=0.0,
                               bytes_down=self.bytes_down, backend="synthetic")
        ref = BlobRefModel(sha256=chunks[0].blob_sha, size=len(blob), chunks=len(chunks))
        report = UpdateReport(run_id=a.run_id, agent_id=self.agent_id, round=a.round, nonce=a.nonce, update=ref,
                              n_train=96, metrics=metrics)
        self.publish(topics.agent_report(self.agent_id), encode_message(report))
        self.bytes_down = 0
        self.status("idle")


class Fleet:
    """Many SyntheticAgents on one selector: paho's external-loop callbacks keep the selector in sync."""

    def __init__(self, port: int, agent_ids: list[str], shapes: dict[str, tuple[int, ...]], seed: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.agents: list[SyntheticAgent] = []
        self.disconnects = 0
        rng = np.random.default_rng(seed)
        for agent_id in agent_ids:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=agent_id, protocol=paho.MQTTv5)
            agent = SyntheticAgent(agent_id, client, shapes, rng)
            self._wire(agent)
            self.agents.append(agent)

    def _wire(self, agent: SyntheticAgent) -> None:
        client = agent.client
        will_props = Properties(PacketTypes.WILLMESSAGE)
        will_props.WillDelayInterval = 10
        client.will_set(topics.agent_status(agent.agent_id),
                        encode_message(AgentStatus(agent_id=agent.agent_id, state="lost")), qos=1, retain=True,
                        properties=will_props)
        selector = self.selector

        def on_socket_open(_c: paho.Client, _u: Any, sock: Any) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            selector.register(sock, selectors.EVENT_READ, agent)

        def on_socket_close(_c: paho.Client, _u: Any, sock: Any) -> None:
            selector.unregister(sock)

        def on_register_write(_c: paho.Client, _u: Any, sock: Any) -> None:
            selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, agent)

        def on_unregister_write(_c: paho.Client, _u: Any, sock: Any) -> None:
            selector.modify(sock, selectors.EVENT_READ, agent)

        def on_connect(_c: paho.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
            if reason.is_failure:
                agent.error = f"connect refused: {reason}"
                return
            agent.connected_at = time.time()
            client.subscribe(topics.agent_inbox(agent.agent_id), qos=1)
            if not agent.joined_once:  # the real agent introduces itself on connect
                agent.joined_once = True
                agent.join()

        def on_disconnect(_c: paho.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
            if not agent.finished:
                self.disconnects += 1
                agent.error = f"disconnected: {reason}"

        client.on_socket_open = on_socket_open
        client.on_socket_close = on_socket_close
        client.on_socket_register_write = on_register_write
        client.on_socket_unregister_write = on_unregister_write
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = lambda _c, _u, msg: agent.on_message(msg)

    def _poll(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            client = key.data.client
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE and client.want_write():
                client.loop_write()

    def run(self, time_limit_s: float, connect_batch: int = 25) -> None:
        deadline = time.monotonic() + time_limit_s
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        for i, agent in enumerate(self.agents):  # connect in small batches so the broker's backlog keeps up
            agent.client.connect(HOST, self.port, keepalive=30, clean_start=False, properties=props)
            if i % connect_batch == connect_batch - 1:
                self._poll(0.01)
        next_misc = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if all(a.finished for a in self.agents):
                break
            self._poll(0.05)
            if time.monotonic() >= next_misc:
                for agent in self.agents:
                    agent.client.loop_misc()  # keepalive pings
                next_misc = time.monotonic() + 1.0
        finish_by = time.monotonic() + 5.0  # flush the "left" statuses, then disconnect cleanly
        for agent in self.agents:
            agent.client.disconnect()
        while time.monotonic() < finish_by and any(a.client.want_write() for a in self.agents):
            self._poll(0.05)

    def report(self) -> dict[str, Any]:
        return {
            "agents": len(self.agents),
            "finished": sum(a.finished for a in self.agents),
            "errors": [f"{a.agent_id}: {a.error}" for a in self.agents if a.error][:20],
            "error_count": sum(bool(a.error) for a in self.agents),
            "disconnects": self.disconnects,
            "cpu_s": cpu_seconds(),
            "peak_rss_mb": peak_rss_mb(),
            "per_agent": {a.agent_id: {"connected": a.connected_at, "joined": a.joined_at,
                                       "rounds": {r: vars(rec) for r, rec in a.rounds.items()}}
                          for a in self.agents},
        }


def parse_ids(spec: str) -> list[str]:
    """'prefix0000:prefix0249' -> the 250 ids in between (same prefix and width)."""
    first, _, last = spec.partition(":")
    digits = len(first) - len(first.rstrip("0123456789"))
    prefix, start, stop = first[:-digits], int(first[-digits:]), int(last[-digits:])
    return [f"{prefix}{i:0{digits}d}" for i in range(start, stop + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ids", required=True, help="first:last agent id, e.g. s0000:s0249")
    parser.add_argument("--shapes", type=Path, required=True, help="JSON {tensor name: shape} from the manifest")
    parser.add_argument("--time-limit", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shapes = {name: tuple(shape) for name, shape in json.loads(args.shapes.read_text()).items()}
    fleet = Fleet(args.port, parse_ids(args.ids), shapes, args.seed)
    fleet.run(args.time_limit)
    json.dump(fleet.report(), sys.stdout)


if __name__ == "__main__":
    main()
