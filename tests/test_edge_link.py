"""The emulated edge link (bench/link_emulator.py) and blob downloads that survive a cut link.

The link itself is checked against what it promises (rate, latency, loss as delay, cuts); the resume
tests download a blob from a real mosquitto through the link with the agent's fetch code
(``fetch_blob`` with a ``ChunkSpool``, as ``edge_agent.agent`` calls it), cut the connection halfway and
count at the link the bytes that really went down.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.link_emulator import EdgeLink, LinkSpec
from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.runner import run_federation
from protocols.chunk_spool import ChunkSpool
from protocols.chunks import BlobRef
from protocols.errors import BlobFetchTimeout
from protocols.mqtt import MqttEndpoint, clear_blob, fetch_blob, publish_blob
from tests.conftest import EndpointFactory
from tests.harness import agent_processes, fleet_data


@pytest.fixture
def sink() -> Iterator[tuple[int, list[tuple[float, int]]]]:
    """A TCP server that echoes everything back and records (time, bytes) of each read."""
    server = socket.create_server(("127.0.0.1", 0))
    reads: list[tuple[float, int]] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def echo(c: socket.socket = conn) -> None:
                with c:
                    while data := c.recv(65536):
                        reads.append((time.monotonic(), len(data)))
                        c.sendall(data)

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], reads
    server.close()


def _drain(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(65536)
        if not data:
            break
        out += data
    return bytes(out)


def test_link_throughput_is_the_configured_rate(sink: tuple[int, list[tuple[float, int]]]) -> None:
    port, reads = sink
    rate = 2_000_000.0
    size = 512 * 1024
    with EdgeLink(("127.0.0.1", port), LinkSpec(rate_bps=rate, rtt=0.0)) as link:
        with socket.create_connection(("127.0.0.1", link.port)) as sock:
            reader = threading.Thread(target=_drain, args=(sock, size), daemon=True)
            reader.start()
            start = time.monotonic()
            sock.sendall(os.urandom(size))
            reader.join(30)
            elapsed = time.monotonic() - start
        assert sum(n for _, n in reads) == size
        assert link.bytes_up == size
    # up and down are shaped separately; the echo comes back through the down bucket at the same rate,
    # so the whole transfer takes size*8/rate plus at most the bucket's burst ahead
    measured = size * 8 / elapsed
    assert 0.85 * rate <= measured <= 1.15 * rate, f"{measured / 1e6:.2f} Mbit/s through a 2 Mbit/s link"


def test_link_adds_its_round_trip_and_loss_costs_a_retransmission_timeout(
    sink: tuple[int, list[tuple[float, int]]],
) -> None:
    port, _ = sink
    times = []
    with EdgeLink(("127.0.0.1", port), LinkSpec(rate_bps=None, rtt=0.2)) as link, \
            socket.create_connection(("127.0.0.1", link.port)) as sock:
        for _ in range(3):
            start = time.monotonic()
            sock.sendall(b"ping")
            assert _drain(sock, 4) == b"ping"
            times.append(time.monotonic() - start)
    assert min(times) >= 0.2, times  # never faster than the round trip
    assert min(times) < 0.4, times  # and the proxy adds little of its own
    with EdgeLink(("127.0.0.1", port), LinkSpec(rate_bps=None, rtt=0.0, loss=1.0, rto=0.1)) as lossy, \
            socket.create_connection(("127.0.0.1", lossy.port)) as sock:
        start = time.monotonic()
        sock.sendall(b"x" * 1448 * 3)  # 3 segments up and 3 down, every one "lost" once
        assert len(_drain(sock, 1448 * 3)) == 1448 * 3  # late, never missing
        # up: the 3 segments wait one RTO each, one after the other (head-of-line); down overlaps with up
        # except for the last segment's own RTO: 4 RTOs in all
        assert time.monotonic() - start >= 0.4 - 0.02


def test_link_cuts_after_a_byte_count_and_can_stay_down(sink: tuple[int, list[tuple[float, int]]]) -> None:
    port, _ = sink
    with EdgeLink(("127.0.0.1", port), LinkSpec(rate_bps=None, rtt=0.0)) as link:
        with socket.create_connection(("127.0.0.1", link.port)) as sock:
            link.cut_after_down(10_000)
            sock.sendall(b"y" * 50_000)
            got = _drain(sock, 50_000)  # ends early: the link closed the connection
        assert 10_000 <= len(got) < 50_000 and link.cuts == 1
        link.refuse = True
        with socket.create_connection(("127.0.0.1", link.port)) as sock:
            assert sock.recv(10) == b""  # accepted and closed at once: the link is down
        link.refuse = False
        with socket.create_connection(("127.0.0.1", link.port)) as sock:
            sock.sendall(b"back")
            assert _drain(sock, 4) == b"back"


def _through(link: EdgeLink, client_id: str, **kwargs: object) -> MqttEndpoint:
    endpoint = MqttEndpoint(client_id, "127.0.0.1", link.port, keepalive=10, **kwargs)  # type: ignore[arg-type]
    endpoint.start()
    return endpoint


SIZE = 16 * 1024 * 1024  # 64 chunks of 256 KiB: a small bundle


def _serve(make_endpoint: EndpointFactory, blob: bytes) -> tuple[MqttEndpoint, BlobRef, list[list[int]]]:
    publisher = make_endpoint()
    ref = publish_blob(publisher, blob, wait_timeout=60)
    return publisher, ref, []


def test_a_download_cut_halfway_resumes_on_reconnect_without_fetching_twice(
    make_endpoint: EndpointFactory, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    blob = os.urandom(SIZE)
    publisher, ref, asked = _serve(make_endpoint, blob)
    spool = ChunkSpool(tmp_path / "partial")
    with EdgeLink((mosquitto.host, mosquitto.port), LinkSpec(rate_bps=None, rtt=0.02)) as link:
        agent = _through(link, f"cut-{os.getpid()}")
        try:
            link.cut_after_down(SIZE // 2)

            def resend(indices: list[int]) -> None:
                asked.append(indices)
                publish_blob(publisher, blob, indices=indices)

            progress: list[int] = []
            data = fetch_blob(agent, ref, request_resend=resend, timeout=120, spool=spool,
                              on_progress=lambda got, total: progress.append(got))
        finally:
            agent.stop()
        assert hashlib.sha256(data).hexdigest() == ref.sha256 == hashlib.sha256(blob).hexdigest()
        assert link.cuts == 1  # the connection really was cut halfway
        assert link.bytes_down <= 1.1 * SIZE, f"{link.bytes_down} bytes down for a {SIZE}-byte blob"
        assert progress == sorted(progress) and progress[-1] == SIZE
    assert not (tmp_path / "partial" / ref.sha256).exists()  # the finished blob's chunks are not kept
    clear_blob(publisher, ref, wait_timeout=30)


def test_a_download_resumes_from_kept_chunks_after_a_restart(
    make_endpoint: EndpointFactory, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    blob = os.urandom(SIZE)
    publisher, ref, _ = _serve(make_endpoint, blob)
    spool = ChunkSpool(tmp_path / "partial")
    with EdgeLink((mosquitto.host, mosquitto.port), LinkSpec(rate_bps=None, rtt=0.02)) as link:
        first = _through(link, f"restart-a-{os.getpid()}")
        link.refuse = True  # once cut, the link stays down: the first attempt dies halfway
        link.cut_after_down(SIZE // 2)
        try:
            with pytest.raises(BlobFetchTimeout):
                fetch_blob(first, ref, request_resend=lambda _i: None, timeout=6, resend_after=30, spool=spool)
        finally:
            first.stop()
        kept = spool.load(ref)
        assert 0 < len(kept) < ref.chunks
        # a chunk damaged at rest is dropped on reuse and fetched again, never trusted
        victim = tmp_path / "partial" / ref.sha256 / f"{kept[0].index}.chunk"
        raw = bytearray(victim.read_bytes())
        raw[-1] ^= 0xFF
        victim.write_bytes(bytes(raw))
        down_before = link.bytes_down
        link.refuse = False
        # the restarted device: a new process, its broker session gone (clean start), the spool on disk
        second = _through(link, f"restart-b-{os.getpid()}", clean_start=True)

        def resend(indices: list[int]) -> None:
            publish_blob(publisher, blob, indices=indices)

        try:
            data = fetch_blob(second, ref, request_resend=resend, timeout=120, spool=spool)
        finally:
            second.stop()
        assert hashlib.sha256(data).hexdigest() == ref.sha256
        resumed = link.bytes_down - down_before
        assert resumed <= SIZE - (len(kept) - 1) * 256 * 1024 + 64 * 1024  # only the missing chunks came again
        assert link.bytes_down <= 1.1 * SIZE, f"{link.bytes_down} bytes down for a {SIZE}-byte blob"
    assert not (tmp_path / "partial" / ref.sha256).exists()
    clear_blob(publisher, ref, wait_timeout=30)


def _agent_run(tmp: Path, cut_at: int | None) -> tuple[EdgeLink, dict[str, Any], str, int]:
    """One real agent process (tiny-3, ORT) joining a real coordinator through the link; optionally cut once."""
    data = fleet_data(tmp, ["link-1"], per_client=40)
    config = RunConfig(run_name="edge-cut", backbones=("tiny-3",), rounds=1, local_steps=2, min_agents=1,
                       pinned={"link-1": "tiny-3"}, task=TaskConfig(max_length=32, batch_size=8),
                       round_timeout_s=120, join_timeout_s=120)
    links: list[EdgeLink] = []
    with agent_processes(tmp, data) as agents:
        def start(host: str, port: int) -> None:
            link = EdgeLink((host, port), LinkSpec(rate_bps=None, rtt=0.01))
            if cut_at is not None:
                link.cut_after_down(cut_at)
            links.append(link)
            agents.start("127.0.0.1", link.port)

        try:
            summary = run_federation(config, tmp / "run", start_agents=start)
            code = agents.wait(60)["link-1"]
        finally:
            for link in links:
                link.close()
        return links[0], summary, agents.full_log("link-1"), code or 0


def test_a_real_agent_whose_link_is_cut_mid_bundle_resumes_and_trains(tmp_path: Path) -> None:
    quiet, quiet_summary, _, quiet_code = _agent_run(tmp_path / "quiet", None)
    download = quiet_summary["bundle_bytes"]["tiny-3"]  # an ORT device's download: the tar and its ORT parts
    cut, summary, log, code = _agent_run(tmp_path / "cut", download // 2)
    assert (quiet_code, code) == (0, 0), log[-2000:]
    assert summary["rounds"] == quiet_summary["rounds"] == 1 and cut.cuts == 1
    assert "lost connection" in log and "fetching" in log and "100 %" in log  # cut, then progress to the end
    print(f"download {download} B; link bytes down: quiet {quiet.bytes_down}, cut {cut.bytes_down} "
          f"(+{(cut.bytes_down - quiet.bytes_down) / download:.1%} of the download)")
    # the cut costs at most a tenth of the download: nothing already received is fetched again
    assert cut.bytes_down - quiet.bytes_down <= 0.1 * download, (cut.bytes_down, quiet.bytes_down, download)
