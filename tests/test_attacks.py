"""The attack suite: every attack of issue 18 that works on a plain broker, replayed against a real mosquitto,
real `edge-agent join` processes (tiny-3 bundles, a few steps, one thread) and the real coordinator.

Attackers are in-process scripts speaking the real protocol: an *outsider* (any client that can reach the
broker, knows no key) and a *device* that was admitted but lies. Every test ends with the run completing and
every committed round equal to the aggregation rule applied to the honest updates only
(tests/harness.py ``assert_rounds_follow_the_rule``, which recomputes it independently). What needs the
provisioned broker (outsider read, client-id reuse) is tested in tests/test_provisioned_fleet.py; docs/security.md
maps every attack to its test.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.runner import build_bundles, run_federation, run_key_path
from coordinator.store import RunStore, load_state
from protocols import topics
from protocols.chunks import BlobRef, encode_chunk, split_blob
from protocols.errors import MessageError
from protocols.messages import (
    AgentStatus,
    Assignment,
    BlobRefModel,
    CoordStatus,
    DeviceProfile,
    Finish,
    JoinAccepted,
    JoinRefused,
    JoinRequest,
    RoundMetrics,
    UpdateAck,
    UpdateReport,
    decode_message,
    encode_message,
)
from protocols.mqtt import Inbound, MqttEndpoint, fetch_blob, publish_blob
from protocols.signing import Signer, generate_key, join_proof, public_path
from protocols.tensors import decode_tensors, encode_tensors, l2_norm
from tests.harness import AgentProcesses, agent_processes, assert_rounds_follow_the_rule, fleet_data

HONEST = ["a1", "a2"]
PROFILE = DeviceProfile(ram_total_mb=4096, ram_available_mb=4096, cores=2, arch="x86_64", gflops=100,
                        disk_free_mb=1e4, backends=["ort"])
METRICS = RoundMetrics(personal_accuracy=0.5, global_accuracy=None, n_test=1, n_global_test=0, train_loss=0.1,
                       train_seconds=0.1, eval_seconds=0.1, peak_rss_mb=1, bytes_down=1, backend="ort")


def config_for(agent_ids: list[str], **overrides: Any) -> RunConfig:
    values: dict[str, Any] = dict(run_name="attacks", backbones=("tiny-3",), rounds=2, local_steps=3,
                                  min_agents=len(agent_ids), pinned={a: "tiny-3" for a in agent_ids},
                                  task=TaskConfig(max_length=32, batch_size=8), round_timeout_s=60,
                                  join_timeout_s=120, learning_rate=5e-3, min_fraction=0.6,
                                  allowed_agents=tuple(agent_ids))
    values.update(overrides)
    return RunConfig(**values)


def decode(item: Inbound | None) -> Any:
    """An attacker reads everything (without verifying anything)."""
    if item is None or not item.payload:
        return None
    try:
        return decode_message(item.payload)
    except MessageError:
        return None


class Script:
    """A client run by the attacker on its own thread; its thread's failures surface in the test."""

    def __init__(self, broker: MosquittoBroker, client_id: str,
                 body: Callable[[MqttEndpoint, threading.Event], None]) -> None:
        self.endpoint = MqttEndpoint(client_id, broker.host, broker.port, clean_start=True)
        self.body, self.error = body, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.body(self.endpoint, self.stop)
        except BaseException as exc:  # reported by finish()
            self.error = exc  # type: ignore[assignment]

    def start(self) -> Script:
        self.endpoint.start(timeout=10)
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.endpoint.stop()
        assert self.error is None, f"attacker script failed: {self.error!r}"


def wait_for_run_id(e: MqttEndpoint, stop: threading.Event) -> str:
    e.subscribe(topics.coord_status())
    while not stop.is_set():
        message = decode(e.get(timeout=0.5))
        if isinstance(message, CoordStatus) and message.state == "online" and message.run_id:
            return message.run_id
    raise TimeoutError("no coordinator status")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, AgentProcesses]]:
    """Broker + two honest agents that verify the run key the run generates into tmp/run/keys."""
    build_bundles(config_for(HONEST))  # export before anything is timed
    data = fleet_data(tmp_path, HONEST)
    with MosquittoBroker(tmp_path / "broker") as broker, \
            agent_processes(tmp_path, data, coordinator_key=public_path(run_key_path(tmp_path / "run"))) as agents:
        yield broker, agents


def run(tmp: Path, config: RunConfig, broker: MosquittoBroker, agents: AgentProcesses, **kwargs: Any
        ) -> dict[str, Any]:
    summary = run_federation(config, tmp / "run", broker=broker.address, start_agents=agents.start, **kwargs)
    codes = agents.wait(60)
    assert all(codes[a] == 0 for a in agents.procs), {a: agents.log(a) for a in agents.procs}
    return summary


def test_forged_finish_retained_or_not_never_stops_an_agent(tmp_path: Path, fleet: Any) -> None:
    """An outsider leaves retained forged Finish and status messages before the agents start (a made-up run id),
    then, once it has read the real run id, sends Finish with it: plain, signed with its own key, and a genuine
    coordinator message replayed to the other agent and again to its own. Nobody stops; the run completes."""
    broker, agents = fleet
    seen: dict[str, list[Any]] = {"replayed": []}

    def outsider(e: MqttEndpoint, stop: threading.Event) -> None:
        fake = Signer(generate_key())
        made_up = encode_message(Finish(run_id="run-forged", reason="forged"))
        # A topic keeps one retained message: a plain one for a1, one signed with the outsider's key for a2.
        e.publish(topics.agent_inbox("a1"), made_up, retain=True)
        e.publish(topics.agent_inbox("a2"), fake.seal("run-forged", topics.agent_inbox("a2"), made_up), retain=True)
        e.publish(topics.coord_status(), encode_message(CoordStatus(state="online", run_id="run-forged")),
                  retain=True)
        run_id = wait_for_run_id(e, stop)
        for agent in HONEST:
            e.subscribe(topics.agent_inbox(agent))
        joined: set[str] = set()
        while not stop.is_set() and joined != set(HONEST):  # wait until both are in the run, then strike
            item = e.get(timeout=0.5)
            message = decode(item)
            if item is not None and isinstance(message, JoinAccepted) and not item.retain:
                joined.add(message.agent_id)
        for agent in HONEST:
            inbox = topics.agent_inbox(agent)
            finish = encode_message(Finish(run_id=run_id, reason="forged, real run id"))
            e.publish(inbox, finish)
            e.publish(inbox, fake.seal(run_id, inbox, finish))
            e.publish(inbox, fake.seal(run_id, inbox, finish), retain=True)
        replayed: set[bytes] = set()
        while not stop.is_set():  # replay the coordinator's own signed messages to both inboxes, once each
            item = e.get(timeout=0.5)
            if item is None or item.retain or item.payload in replayed:
                continue
            if isinstance(decode(item), (Assignment, UpdateAck)):
                replayed.add(item.payload)
                for agent in HONEST:  # to its own inbox again (a replay) and to the other's (another topic)
                    e.publish(topics.agent_inbox(agent), item.payload)
                seen["replayed"].append(decode(item).type)

    script = Script(broker, "outsider", outsider).start()
    time.sleep(1.0)  # the retained forgeries are in place before any agent subscribes
    summary = run(tmp_path, config_for(HONEST), broker, agents)
    script.finish()
    assert summary["rounds"] == 2 and summary["stopped"] is None
    assert seen["replayed"], "the outsider never got to replay anything"
    for agent in HONEST:
        log = agents.full_log(agent)
        assert "finished: completed all rounds" in log, log  # the Finish it acted on is the coordinator's
        assert "not signed by the coordinator" in log and "does not verify" in log, log
        assert "a replay" in log and "replayed from another topic" in log, log
    rows = RunStore(tmp_path / "run").metrics()
    assert {(r.round, r.agent_id) for r in rows if r.accepted} == {(r, a) for r in (1, 2) for a in HONEST}
    assert_rounds_follow_the_rule(tmp_path / "run", dict.fromkeys(HONEST, "tiny-3"))


def test_forged_assignment_never_makes_an_agent_upload(tmp_path: Path) -> None:
    """An outsider sends a1 and a2 an assignment for round 99 asking for the local head (head.*), plain and
    signed with its own key. a1 verifies signatures and ignores it; a2 runs with --insecure-no-verify and acts
    on it, but its upload guard refuses to send a local tensor. Nothing is uploaded for round 99."""
    build_bundles(config_for(HONEST))
    manifest = build_bundles(config_for(HONEST))["tiny-3"].manifest
    heads = sorted(t.name for t in manifest.tensors if t.name.startswith("head."))
    assert heads and all(t.scope == "local" for t in manifest.tensors if t.name in heads)
    data = fleet_data(tmp_path, HONEST)
    key = public_path(run_key_path(tmp_path / "run"))
    uploads_99: list[str] = []
    with MosquittoBroker(tmp_path / "broker") as broker, \
            agent_processes(tmp_path, data, coordinator_key=key,
                            extra={"a2": ["--insecure-no-verify"]}) as agents:

        def outsider(e: MqttEndpoint, stop: threading.Event) -> None:
            fake = Signer(generate_key())
            run_id = wait_for_run_id(e, stop)
            e.subscribe("fl/v1/agents/+/inbox")
            e.subscribe("fl/v1/agents/+/update/99")
            e.subscribe("fl/v1/agents/+/report")
            joined: set[str] = set()
            while not stop.is_set():
                item = e.get(timeout=0.5)
                message = decode(item)
                if item is not None and item.topic.endswith("/update/99"):
                    uploads_99.append(item.topic)
                if isinstance(message, UpdateReport) and message.round == 99:
                    uploads_99.append(item.topic)  # type: ignore[union-attr]
                if isinstance(message, JoinAccepted) and message.agent_id not in joined:
                    joined.add(message.agent_id)
                    inbox = topics.agent_inbox(message.agent_id)
                    forged = encode_message(Assignment(
                        run_id=run_id, round=99, nonce="forged", backbone="tiny-3", bundle=message.bundle,
                        weights=message.bundle, upload_names=heads, local_steps=1, batch_size=8,
                        learning_rate=1e-3, deadline_unix=time.time() + 600, seed=0))
                    e.publish(inbox, forged)
                    e.publish(inbox, fake.seal(run_id, inbox, forged))

        script = Script(broker, "outsider", outsider).start()
        summary = run(tmp_path, config_for(HONEST), broker, agents)
        time.sleep(1.0)
        script.finish()
    assert summary["rounds"] == 2
    assert uploads_99 == [], uploads_99
    assert "not signed by the coordinator" in agents.full_log("a1") and "does not verify" in agents.full_log("a1")
    assert "never sends" in agents.full_log("a2") and "head." in agents.full_log("a2"), agents.full_log("a2")
    assert_rounds_follow_the_rule(tmp_path / "run", dict.fromkeys(HONEST, "tiny-3"))


def test_forged_and_unknown_joins_are_refused_without_a_bundle(tmp_path: Path, fleet: Any,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The run uses an allow-list and a join token. An outsider joins as an unknown id, as a1 without the token,
    as a2 with a wrong token, and replays a1's genuine join mid-run: every forged join is refused with a logged
    reason and no bundle; the replay changes nothing; a1 and a2 train every round."""
    broker, agents = fleet
    token = b"join-token-for-the-attack-suite-0123456789"
    token_file = tmp_path / "join-token"
    token_file.write_bytes(token)
    token_file.chmod(0o600)
    agents.extra = {a: ["--join-token-file", str(token_file)] for a in HONEST}
    answers: list[Any] = []

    def outsider(e: MqttEndpoint, stop: threading.Event) -> None:
        for agent in ("intruder", "a1", "a2"):
            e.subscribe(topics.agent_inbox(agent))
        e.subscribe(topics.agents_filter("join"))
        run_id = wait_for_run_id(e, stop)
        intruder = JoinRequest(agent_id="intruder", nonce="i1", profile=PROFILE, n_train=100, n_test=30,
                               agent_key=Signer(generate_key()).public_hex)
        e.publish(topics.agent_join("intruder"), encode_message(
            intruder.model_copy(update={"proof": join_proof(token, run_id, intruder)})))  # even with the token
        as_a1 = JoinRequest(agent_id="a1", nonce="f1", profile=PROFILE, n_train=10**6, n_test=30)
        e.publish(topics.agent_join("a1"), encode_message(as_a1))
        as_a2 = JoinRequest(agent_id="a2", nonce="f2", profile=PROFILE, n_train=10**6, n_test=30)
        e.publish(topics.agent_join("a2"), encode_message(
            as_a2.model_copy(update={"proof": join_proof(b"a-guessed-token-000000", run_id, as_a2)})))
        genuine: bytes | None = None
        while not stop.is_set():
            item = e.get(timeout=0.5)
            message = decode(item)
            if item is None:
                continue
            if item.topic == topics.agent_join("a1") and isinstance(message, JoinRequest) and message.nonce != "f1":
                genuine = item.payload
            if isinstance(message, (JoinAccepted, JoinRefused)):
                answers.append(message)
            if isinstance(message, Assignment) and genuine is not None:
                e.publish(topics.agent_join("a1"), genuine)  # mid-round: must not drop a1's round
                genuine = None

    script = Script(broker, "outsider", outsider).start()
    with caplog.at_level(logging.WARNING, logger="coordinator"):
        summary = run(tmp_path, config_for(HONEST), broker, agents, join_token=token)
    script.finish()
    assert summary["rounds"] == 2
    assert set(summary["agents"]) == set(HONEST)
    assert "allow-list" in summary["refused"]["intruder"]
    refused = {(m.agent_id, m.nonce) for m in answers if isinstance(m, JoinRefused)}
    assert {("intruder", "i1"), ("a1", "f1"), ("a2", "f2")} <= refused, answers
    assert not any(isinstance(m, JoinAccepted) and m.nonce in ("i1", "f1", "f2") for m in answers)
    logged = caplog.text
    assert "requires a join token" in logged and "does not match" in logged and "allow-list" in logged
    assert "rejoined mid-round" not in logged
    rows = RunStore(tmp_path / "run").metrics()
    assert {(r.round, r.agent_id) for r in rows if r.accepted} == {(r, a) for r in (1, 2) for a in HONEST}
    assert_rounds_follow_the_rule(tmp_path / "run", dict.fromkeys(HONEST, "tiny-3"))


class LyingDevice:
    """An admitted device (a3) that joins properly (declares 100 samples, announces its key, signs its reports)
    and then lies each round as ``lie(round, upload)`` says: returns the n_train to report (any int, even
    negative), after changing the upload in place if it likes."""

    def __init__(self, broker: MosquittoBroker, lie: Callable[[int, dict[str, np.ndarray]], int],
                 agent_id: str = "a3", *, leave_after: int | None = None) -> None:
        self.agent_id, self.lie, self.leave_after = agent_id, lie, leave_after
        self.signer = Signer(generate_key())
        self.acks: list[UpdateAck] = []
        self.norms: dict[int, float] = {}
        self.script = Script(broker, agent_id, self._body)

    def _body(self, e: MqttEndpoint, stop: threading.Event) -> None:
        me = self.agent_id
        e.subscribe(topics.agent_inbox(me))
        run_id = wait_for_run_id(e, stop)
        e.publish(topics.agent_join(me), encode_message(JoinRequest(
            agent_id=me, nonce="j1", profile=PROFILE, n_train=100, n_test=30, agent_key=self.signer.public_hex)))
        while not stop.is_set():
            message = decode(e.get(timeout=0.5))
            if isinstance(message, UpdateAck):
                self.acks.append(message)
                if message.accepted and message.round == self.leave_after:  # gone, as a stopped agent is
                    e.publish(topics.agent_status(me), encode_message(AgentStatus(agent_id=me, state="left")),
                              retain=True)
                    return
            if not isinstance(message, Assignment) or message.evaluate_only:
                continue  # the final evaluation: this device has nothing to lie about there
            weights = decode_tensors(fetch_blob(e, message.weights.to_ref(), request_resend=lambda _i: None))
            upload = {n: np.array(weights[n], copy=True) for n in message.upload_names}
            n_train = self.lie(message.round, upload)
            self.norms[message.round] = l2_norm(upload)
            blob = encode_tensors(upload)
            ref = publish_blob(e, blob, retain=False, topic=topics.agent_update_chunk(me, message.round))
            report = json.loads(encode_message(UpdateReport(
                run_id=run_id, agent_id=me, round=message.round, nonce=message.nonce,
                update=BlobRefModel.from_ref(ref), n_train=1, metrics=METRICS)))
            report["n_train"] = n_train  # whatever it likes, past every client-side model
            topic = topics.agent_report(me)
            e.publish(topic, self.signer.seal(run_id, topic, json.dumps(report).encode()))


def _scale_to(upload: dict[str, np.ndarray], norm: float) -> None:
    factor = norm / l2_norm(upload)
    for value in upload.values():
        value *= np.float32(factor)


def test_a_device_cannot_poison_the_mean(tmp_path: Path, fleet: Any, caplog: pytest.LogCaptureFixture) -> None:
    """An admitted device reports n_train 0, then 10^9, then -1, then an update of L2 norm just under the
    absolute bound (0.99 x max_update_norm, far above the honest ones). Each is rejected with its reason and the
    aggregate of every round is the rule over the honest updates only."""
    broker, agents = fleet
    config = config_for([*HONEST, "a3"], rounds=4, round_timeout_s=45)
    schedule = {1: 0, 2: 10**9, 3: -1, 4: 100}

    def lie(round_id: int, upload: dict[str, np.ndarray]) -> int:
        if round_id == 4:
            _scale_to(upload, 0.99 * config.max_update_norm)
        return schedule[round_id]

    device = LyingDevice(broker, lie)
    device.script.start()
    with caplog.at_level(logging.WARNING, logger="coordinator"):
        summary = run(tmp_path, config, broker, agents)
    device.script.finish()
    assert summary["rounds"] == 4 and summary["stopped"] is None
    rows = {(r.round, r.agent_id): r for r in RunStore(tmp_path / "run").metrics()}
    assert "must be > 0" in rows[(1, "a3")].reason and not rows[(1, "a3")].accepted
    assert "exceeds the 100 training samples" in rows[(2, "a3")].reason and not rows[(2, "a3")].accepted
    assert (3, "a3") not in rows  # its report did not decode: no update, no row, and the round went on
    assert "malformed message from a3" in caplog.text and "n_train" in caplog.text
    assert config.max_update_norm * 0.98 < device.norms[4] < config.max_update_norm
    assert "median norm" in rows[(4, "a3")].reason and not rows[(4, "a3")].accepted, rows[(4, "a3")]
    assert not (tmp_path / "run" / "updates" / "round-0004" / "a3.safetensors").exists()
    assert any(not a.accepted and "median norm" in a.reason for a in device.acks), device.acks
    assert all(rows[(r, a)].accepted for r in range(1, 5) for a in HONEST)
    assert_rounds_follow_the_rule(tmp_path / "run", dict.fromkeys([*HONEST, "a3"], "tiny-3"))


def test_a_device_cannot_report_for_another(tmp_path: Path, fleet: Any, caplog: pytest.LogCaptureFixture) -> None:
    """On a plain broker anyone can write a1's topics. As soon as a1 is assigned a round, an attacker (reading
    a1's inbox for the nonce) uploads a poisoned update on a1's update topic and reports it on a1's report topic,
    unsigned and signed with its own key. The coordinator accepts only the report signed with the key a1 joined
    with: a1's own update is used, the poison never."""
    broker, agents = fleet
    struck: list[int] = []

    def attacker(e: MqttEndpoint, stop: threading.Event) -> None:
        impostor = Signer(generate_key())
        run_id = wait_for_run_id(e, stop)
        e.subscribe(topics.agent_inbox("a1"))
        while not stop.is_set():
            message = decode(e.get(timeout=0.5))
            if not isinstance(message, Assignment) or message.round in struck:
                continue
            weights = decode_tensors(fetch_blob(e, message.weights.to_ref(), request_resend=lambda _i: None))
            poison = {n: np.full_like(weights[n], 3.0) for n in message.upload_names}
            blob = encode_tensors(poison)
            ref = BlobRef.from_blob(blob, chunk_size=4096)
            for chunk in split_blob(blob, 4096):
                e.publish(topics.agent_update_chunk("a1", message.round), encode_chunk(chunk))
            report = encode_message(UpdateReport(run_id=run_id, agent_id="a1", round=message.round,
                                                 nonce=message.nonce, update=BlobRefModel.from_ref(ref),
                                                 n_train=50, metrics=METRICS))
            topic = topics.agent_report("a1")
            e.publish(topic, report)
            e.publish(topic, impostor.seal(run_id, topic, report))
            struck.append(message.round)

    script = Script(broker, "impostor", attacker).start()
    with caplog.at_level(logging.WARNING, logger="coordinator"):
        summary = run(tmp_path, config_for(HONEST), broker, agents)
    script.finish()
    assert "unsigned report" in caplog.text and "does not verify" in caplog.text  # both forgeries reached it
    assert summary["rounds"] == 2 and struck == [1, 2, 3]  # 3: the final evaluation, forged as well
    assert summary["final"]["agents"]["a1"]["n_test"] != METRICS.n_test  # a1's own evaluation, not the forgery
    rows = RunStore(tmp_path / "run").metrics()
    assert {(r.round, r.agent_id) for r in rows if r.accepted} == {(r, a) for r in (1, 2) for a in HONEST}
    for round_id in (1, 2):
        used = load_file(str(tmp_path / "run" / "updates" / f"round-{round_id:04d}" / "a1.safetensors"))
        assert not all(np.all(v == 3.0) for v in used.values()), "the forged update was used as a1's"
    assert [r.n_train for r in rows if r.agent_id == "a1"] != [50, 50]
    assert_rounds_follow_the_rule(tmp_path / "run", dict.fromkeys(HONEST, "tiny-3"))


def test_no_live_agents_left_ends_the_run_cleanly(tmp_path: Path) -> None:
    """The only device leaves after round 1 (as an agent stopped by a forged Finish used to): the coordinator
    does not die with a traceback; it ends the run, sends Finish, and writes metrics.csv and summary.json with
    the committed round and why it stopped."""
    config = config_for(["a3"], rounds=3)
    build_bundles(config)

    def honest_then_gone(round_id: int, upload: dict[str, np.ndarray]) -> int:
        return 100

    with MosquittoBroker(tmp_path / "broker") as broker:
        device = LyingDevice(broker, honest_then_gone, leave_after=1)
        device.script.start()
        summary = run_federation(config, tmp_path / "run", broker=broker.address)
        device.script.finish()
    assert summary["rounds"] == 1
    assert "no live agents" in str(summary["stopped"])
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["stopped"] == summary["stopped"] and written["rounds"] == 1
    lines = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 2 and ",a3," in lines[1]


def test_robust_median_bounds_a_device_within_every_bound(tmp_path: Path, fleet: Any) -> None:
    """A device that stays inside every bound (its update is the received weights plus a shift that keeps its
    norm under 3 x the median) still moves the sample-weighted mean; with robust_rule = "median" every committed
    coordinate is the median of the three accepted updates (recomputed here), so it lies between honest ones."""
    broker, agents = fleet
    config = config_for([*HONEST, "a3"], robust_rule="median")

    def nudge(round_id: int, upload: dict[str, np.ndarray]) -> int:
        for value in upload.values():
            value += np.float32(0.05)  # small enough for the relative bound, the same for every coordinate
        return 100

    device = LyingDevice(broker, nudge)
    device.script.start()
    summary = run(tmp_path, config, broker, agents)
    device.script.finish()
    assert summary["rounds"] == 2
    run_dir = tmp_path / "run"
    rows = RunStore(run_dir).metrics()
    assert all(r.accepted for r in rows) and len(rows) == 6, [(r.agent_id, r.reason) for r in rows]
    for round_id in (1, 2):
        folder = run_dir / "updates" / f"round-{round_id:04d}"
        updates = [load_file(str(folder / f"{a}.safetensors")) for a in (*HONEST, "a3")]
        after = load_state(run_dir / "tensors" / f"round-{round_id:04d}.safetensors")
        for name, value in after.global_tensors.items():  # one group: CMGA's global is the group's estimate
            expected = np.median(np.stack([u[name].astype(np.float64) for u in updates]), axis=0)
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        for name, value in after.group_tensors["tiny-3"].items():
            expected = np.median(np.stack([u[name].astype(np.float64) for u in updates]), axis=0)
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
            mean = np.mean(np.stack([u[name].astype(np.float64) for u in updates]), axis=0)
            assert not np.allclose(value, mean), f"{name}: the median should differ from the mean here"
