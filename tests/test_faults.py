"""Fault injection on whole federations: real mosquitto, real agent processes, tiny backbones.

Each scenario ends with the run completing its rounds, and every committed round equal to the aggregation rule
applied to exactly the updates it accepted (recomputed independently in tests/harness.py): nothing accepted is
lost, nothing rejected is used.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.runner import build_bundles, run_federation
from coordinator.store import RunStore, load_state
from protocols import topics
from protocols.chunks import BlobRef, encode_chunk, split_blob
from protocols.messages import (
    Assignment,
    BlobRefModel,
    DeviceProfile,
    JoinAccepted,
    JoinRequest,
    ResendRequest,
    RoundMetrics,
    UpdateAck,
    UpdateReport,
    decode_message,
    encode_message,
)
from protocols.mqtt import MqttEndpoint, fetch_blob, publish_blob
from protocols.tensors import decode_tensors, encode_tensors
from tests.harness import AgentProcesses, agent_processes, assert_rounds_follow_the_rule, fleet_data

SIX = {"a1": "tiny-3", "a2": "tiny-3", "a3": "tiny-3", "a4": "tiny-6", "a5": "tiny-6", "a6": "tiny-6"}


def tiny_config(pins: dict[str, str], **overrides: Any) -> RunConfig:
    values: dict[str, Any] = dict(run_name="faults", backbones=("tiny-3", "tiny-6"), rounds=3, local_steps=30,
                                  min_agents=len(pins), pinned=pins, task=TaskConfig(max_length=32, batch_size=8),
                                  round_timeout_s=60, join_timeout_s=120, learning_rate=5e-3, min_fraction=0.5)
    values.update(overrides)
    return RunConfig(**values)


def committed_rounds(run_dir: Path) -> int:
    path = run_dir / "coordinator.sqlite"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        try:
            row = db.execute("SELECT MAX(round_id) FROM rounds").fetchone()
        except sqlite3.OperationalError:
            return 0
    return int(row[0] or 0)


def joined(run_dir: Path) -> int:
    path = run_dir / "coordinator.sqlite"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM agents WHERE status = 'joined'").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def run_in_thread(config: RunConfig, run_dir: Path, broker: MosquittoBroker,
                  agents: AgentProcesses) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = run_federation(config, run_dir, broker=broker.address, start_agents=agents.start)
        except BaseException as exc:  # surfaced by the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def finish(thread: threading.Thread, outcome: dict[str, Any], agents: AgentProcesses, timeout: float = 240) -> Any:
    thread.join(timeout)
    assert not thread.is_alive(), "the run did not finish"
    if "error" in outcome:
        raise AssertionError(f"run failed: {outcome['error']}\n" + agents.log(next(iter(agents.procs))))
    return outcome["summary"]


def test_a_third_of_the_agents_killed_in_every_round(tmp_path: Path) -> None:
    """Two of six agents are killed with SIGKILL in the middle of every round and restarted a moment later
    (a power cut and a reboot): each round closes with the survivors, the restarted ones rejoin and train in
    the next round."""
    build_bundles(tiny_config(SIX))  # export before the clock starts
    data = fleet_data(tmp_path, list(SIX))
    config = tiny_config(SIX)
    victims = {1: ("a2", "a5"), 2: ("a3", "a6"), 3: ("a1", "a4")}
    with MosquittoBroker(tmp_path / "broker") as broker, agent_processes(tmp_path, data) as agents:
        thread, outcome = run_in_thread(config, tmp_path / "run", broker, agents)
        wait_for(lambda: joined(tmp_path / "run") == len(SIX), 180, "all agents to join")
        for round_id, pair in victims.items():
            def previous_committed(r: int = round_id) -> bool:
                return committed_rounds(tmp_path / "run") >= r - 1

            wait_for(previous_committed, 180, f"round {round_id}")
            time.sleep(0.5)  # round `round_id` is under way
            for victim in pair:
                agents.kill(victim)
            time.sleep(0.5)
            agents.start(broker.host, broker.port, list(pair))
        summary = finish(thread, outcome, agents)
    assert summary["rounds"] == 3
    rows = RunStore(tmp_path / "run").metrics()
    for round_id in victims:
        accepted = {r.agent_id for r in rows if r.round == round_id and r.accepted}
        assert len(accepted) >= 3 and accepted <= set(SIX), (round_id, accepted)
    assert {r.agent_id for r in rows if r.accepted} == set(SIX)  # the restarted ones came back and trained
    with sqlite3.connect(tmp_path / "run" / "coordinator.sqlite") as db:
        durations = [f - s for s, f in db.execute("SELECT started, finished FROM rounds ORDER BY round_id")]
    assert len(durations) == 3 and max(durations) <= config.round_timeout_s + 5, durations
    assert_rounds_follow_the_rule(tmp_path / "run", SIX)


def test_broker_restarted_mid_round(tmp_path: Path) -> None:
    pins = {"a1": "tiny-3", "a2": "tiny-3", "a4": "tiny-6", "a5": "tiny-6"}
    data = fleet_data(tmp_path, list(pins))
    config = tiny_config(pins, min_fraction=1.0)
    with MosquittoBroker(tmp_path / "broker") as broker, agent_processes(tmp_path, data) as agents:
        thread, outcome = run_in_thread(config, tmp_path / "run", broker, agents)
        wait_for(lambda: committed_rounds(tmp_path / "run") >= 1, 180, "round 1")
        time.sleep(0.3)
        broker.restart()  # SIGTERM, no persistence: retained blobs, sessions and subscriptions are gone
        summary = finish(thread, outcome, agents)
    assert summary["rounds"] == 3
    assert all(entry["accepted"] == len(pins) for entry in summary["per_round"])
    assert_rounds_follow_the_rule(tmp_path / "run", pins)


class RogueAgent:
    """A scripted device speaking the real protocol: it joins properly, then sends poisoned tensors of the right
    names and shapes, replays old reports, floods garbage, and (``flaky``) mangles its upload in flight: one
    chunk corrupted, one duplicated, the last one dropped, repaired only when the coordinator asks."""

    def __init__(self, broker: MosquittoBroker, agent_id: str, poison: Callable[[dict[str, np.ndarray]], None],
                 *, flaky: bool = False):
        self.agent_id, self.poison, self.flaky = agent_id, poison, flaky
        self.blobs: dict[str, bytes] = {}
        self.resend_requests: list[ResendRequest] = []
        self.endpoint = MqttEndpoint(agent_id, broker.host, broker.port, clean_start=True)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.stop = threading.Event()
        self.acks: list[UpdateAck] = []
        self.round = 0
        self.sent_reports: list[bytes] = []

    def run(self) -> None:
        e, me = self.endpoint, self.agent_id
        e.start()
        e.subscribe(topics.agent_inbox(me))
        e.subscribe(topics.coord_status())
        while (item := e.get(timeout=60)) is not None and b"online" not in item.payload:
            pass  # join once the coordinator listens
        profile = DeviceProfile(ram_total_mb=4096, ram_available_mb=4096, cores=2, arch="x86_64", gflops=100,
                                disk_free_mb=1e4, backends=["ort"])
        e.publish(topics.agent_join(me), encode_message(JoinRequest(agent_id=me, nonce="n0", profile=profile,
                                                                    n_train=100, n_test=30)))
        while not self.stop.is_set():
            item = e.get(timeout=0.2)
            if item is None or not item.payload:
                continue
            message = decode_message(item.payload)
            if isinstance(message, UpdateAck):
                self.acks.append(message)
            if isinstance(message, ResendRequest) and message.blob in self.blobs:
                self.resend_requests.append(message)
                publish_blob(e, self.blobs[message.blob], retain=False, indices=message.indices, chunk_size=4096,
                             topic=topics.agent_update_chunk(me, self.round))
            if isinstance(message, JoinAccepted):
                e.publish(topics.agent_report(me), b"\x00not json at all")  # malformed flood, all topics
                e.publish(topics.agent_join(me), b"{}" * 100)
                e.publish(topics.agent_update_chunk(me, 1), os.urandom(300))
            if isinstance(message, Assignment) and not message.evaluate_only:  # the final evaluation: ignored
                for old in self.sent_reports:  # replay every earlier report: must be refused as stale
                    e.publish(topics.agent_report(me), old)
                weights = decode_tensors(fetch_blob(e, message.weights.to_ref(), request_resend=lambda _i: None))
                upload = {n: np.array(weights[n], copy=True) for n in message.upload_names}
                self.poison(upload)
                blob, self.round = encode_tensors(upload), message.round
                ref = BlobRef.from_blob(blob, chunk_size=4096)
                self.blobs[ref.sha256] = blob
                chunk_topic = topics.agent_update_chunk(me, message.round)
                frames = [encode_chunk(c) for c in split_blob(blob, 4096)]
                if self.flaky:  # corrupt the first, duplicate the second, drop the last
                    frames[0] = frames[0][:-1] + bytes([frames[0][-1] ^ 0xFF])
                    frames = [*frames[:2], frames[1], *frames[2:-1]]
                for frame in frames:
                    e.publish(chunk_topic, frame)
                metrics = RoundMetrics(personal_accuracy=0.5, global_accuracy=None, n_test=1, n_global_test=0,
                                       train_loss=0.1, train_seconds=0.1, eval_seconds=0.1, peak_rss_mb=1,
                                       bytes_down=1, backend="ort")
                report = UpdateReport(run_id=message.run_id, agent_id=me, round=message.round, nonce=message.nonce,
                                      update=BlobRefModel.from_ref(ref), n_train=100, metrics=metrics)  # as declared
                self.sent_reports.append(encode_message(report))
                e.publish(topics.agent_report(me), self.sent_reports[-1])
        e.stop()


def _nan(upload: dict[str, np.ndarray]) -> None:
    name = sorted(upload)[0]
    upload[name].flat[0] = np.nan


def _huge(upload: dict[str, np.ndarray]) -> None:
    for value in upload.values():
        value *= 1e6


@pytest.mark.parametrize("poison, reason", [(_nan, "NaN"), (_huge, "norm")])
def test_poisoned_updates_are_rejected_and_never_used(tmp_path: Path, poison: Callable[..., None],
                                                      reason: str) -> None:
    pins = {"a1": "tiny-3", "a4": "tiny-6", "rogue": "tiny-3"}
    data = fleet_data(tmp_path, ["a1", "a4"])
    config = tiny_config(pins, rounds=2, max_update_norm=1e3)
    with MosquittoBroker(tmp_path / "broker") as broker, agent_processes(tmp_path, data) as agents:
        rogue = RogueAgent(broker, "rogue", poison)
        thread, outcome = run_in_thread(config, tmp_path / "run", broker, agents)
        time.sleep(1.0)
        rogue.thread.start()
        summary = finish(thread, outcome, agents)
        rogue.stop.set()
        rogue.thread.join(10)
    assert summary["rounds"] == 2
    rows = RunStore(tmp_path / "run").metrics()
    rogue_rows = [r for r in rows if r.agent_id == "rogue"]
    assert rogue_rows and all(not r.accepted and reason in r.reason for r in rogue_rows), rogue_rows
    assert all(r.accepted for r in rows if r.agent_id != "rogue")
    assert not (tmp_path / "run" / "updates" / "round-0001" / "rogue.safetensors").exists()
    assert any(not ack.accepted and reason in ack.reason for ack in rogue.acks), rogue.acks
    assert any(not ack.accepted and "stale or replayed" in ack.reason and ack.round == 1 for ack in rogue.acks)
    assert_rounds_follow_the_rule(tmp_path / "run", pins)


def test_corrupt_duplicate_and_dropped_chunks_are_repaired_and_used(tmp_path: Path) -> None:
    pins = {"a1": "tiny-3", "a4": "tiny-6", "flaky": "tiny-3"}
    data = fleet_data(tmp_path, ["a1", "a4"])
    config = tiny_config(pins, rounds=2, min_fraction=1.0)
    with MosquittoBroker(tmp_path / "broker") as broker, agent_processes(tmp_path, data) as agents:
        flaky = RogueAgent(broker, "flaky", lambda upload: None, flaky=True)  # an honest (zero) update
        thread, outcome = run_in_thread(config, tmp_path / "run", broker, agents)
        time.sleep(1.0)
        flaky.thread.start()
        summary = finish(thread, outcome, agents)
        flaky.stop.set()
        flaky.thread.join(10)
    assert summary["rounds"] == 2
    rows = RunStore(tmp_path / "run").metrics()
    assert all(r.accepted for r in rows), [(r.agent_id, r.reason) for r in rows if not r.accepted]
    assert {r.agent_id for r in rows if r.round == 2} == set(pins)
    asked = sorted(i for request in flaky.resend_requests for i in request.indices)
    assert 0 in asked and asked[-1] > 1, asked  # the corrupt first chunk and the dropped last one were asked for
    assert_rounds_follow_the_rule(tmp_path / "run", pins)


def _coordinator_process(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "run", *args], stdout=handle,
                                stderr=subprocess.STDOUT)


def _federation_in_processes(tmp: Path, pins: dict[str, str], *, crash_in_round: int | None) -> Path:
    """Coordinator and agents as processes; optionally kill -9 the coordinator mid-round and resume it."""
    data = fleet_data(tmp, list(pins))
    config_file = tmp / "run.toml"
    config_file.write_text(
        'run_name = "crash"\nbackbones = ["tiny-3", "tiny-6"]\nrounds = 3\nlocal_steps = 150\n'
        f"min_agents = {len(pins)}\nround_timeout_s = 60\nlearning_rate = 0.005\n"
        '[task]\nmax_length = 32\nbatch_size = 8\n[pinned]\n' + "".join(f'{a} = "{b}"\n' for a, b in pins.items()))
    run_dir = tmp / "run"
    with MosquittoBroker(tmp / "broker") as broker, agent_processes(tmp, data) as agents:
        coordinator = _coordinator_process(["--config", str(config_file), "--broker", broker.address,
                                            "--out", str(run_dir)], tmp / "coordinator.log")
        try:
            wait_for(lambda: (run_dir / "coordinator.sqlite").exists(), 120, "the coordinator to start")
            agents.start(broker.host, broker.port)
            if crash_in_round is not None:
                wait_for(lambda: committed_rounds(run_dir) >= crash_in_round - 1, 180, "the round before the crash")
                time.sleep(0.3)  # round 2 (150 local steps, several seconds) is under way
                os.kill(coordinator.pid, signal.SIGKILL)
                coordinator.wait(10)
                assert committed_rounds(run_dir) == crash_in_round - 1, "the crash did not land mid-round"
                coordinator = _coordinator_process(["--resume", str(run_dir), "--broker", broker.address],
                                                   tmp / "coordinator.log")
            assert coordinator.wait(240) == 0, (tmp / "coordinator.log").read_text()[-3000:]
            codes = agents.wait(60)
            assert set(codes.values()) == {0}, {a: agents.log(a) for a in codes}
        finally:
            if coordinator.poll() is None:
                coordinator.kill()
    return run_dir


def test_coordinator_killed_mid_round_resumes_with_identical_results(tmp_path: Path) -> None:
    pins = {"a1": "tiny-3", "a2": "tiny-6"}
    crashed = _federation_in_processes(tmp_path / "crashed", pins, crash_in_round=2)
    reference = _federation_in_processes(tmp_path / "reference", pins, crash_in_round=None)
    assert committed_rounds(crashed) == committed_rounds(reference) == 3
    for round_id in (2, 3):
        got = load_state(crashed / "tensors" / f"round-{round_id:04d}.safetensors")
        want = load_state(reference / "tensors" / f"round-{round_id:04d}.safetensors")
        for name, value in want.global_tensors.items():
            np.testing.assert_allclose(got.global_tensors[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
        for group, tensors in want.group_tensors.items():
            for name, value in tensors.items():
                np.testing.assert_allclose(got.group_tensors[group][name], value, rtol=1e-4, atol=1e-6)
    assert_rounds_follow_the_rule(crashed, pins)
