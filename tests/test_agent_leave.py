"""Agents that cannot or will not take part: a bad data file never joins, a wrong label set leaves before the
bundle download, an agent stopped with SIGTERM mid-round tells the coordinator, which drops it at once and
closes the round with the others. All four good agents share one bundle cache directory and start at once.

Real mosquitto, real agent processes, tiny backbones.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from coordinator.broker import MosquittoBroker
from coordinator.runner import build_bundles
from coordinator.store import RunStore
from protocols import topics
from protocols.messages import AgentStatus, decode_message
from protocols.mqtt import MqttEndpoint
from tests.harness import agent_processes, fleet_data
from tests.test_faults import finish, joined, run_in_thread, tiny_config, wait_for

FOUR = {"a1": "tiny-3", "a2": "tiny-3", "a3": "tiny-6", "a4": "tiny-6"}
VICTIM = "a4"


def agent_rows(run_dir: Path) -> dict[str, tuple[str, str]]:
    """agent id -> (status, explanation) as the coordinator recorded it."""
    path = run_dir / "coordinator.sqlite"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        try:
            return {a: (s, e or "") for a, s, e in db.execute("SELECT agent_id, status, explanation FROM agents")}
        except sqlite3.OperationalError:
            return {}


def start_odd_agent(tmp: Path, broker: MosquittoBroker, agent_id: str, data: Path) -> subprocess.Popen[bytes]:
    log = open(tmp / f"{agent_id}.log", "wb")  # noqa: SIM115 - the child holds it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "join", "--broker", broker.address, "--id", agent_id,
             "--data", str(data), "--threads", "1", "--cache-dir", str(tmp / "cache" / agent_id),
             "--max-idle", "60", "--insecure-no-verify"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        log.close()


def test_bad_data_never_joins_and_a_stopped_agent_is_dropped_at_once(tmp_path: Path) -> None:
    build_bundles(tiny_config(FOUR))  # export before the clock starts
    data = fleet_data(tmp_path, list(FOUR))
    # round_timeout_s / 3 = 14 s: shorter than the will path (10 s will delay + 5 s grace) would take
    config = tiny_config(FOUR, rounds=2, local_steps=80, round_timeout_s=42, min_fraction=0.75)
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"text": "fine", "label": "positive"}\nthis is not json\n')
    wrong_labels = tmp_path / "wrong.jsonl"
    wrong_labels.write_text("".join(json.dumps({"text": f"t {i}", "label": ["banana", "apple"][i % 2]}) + "\n"
                                    for i in range(8)))
    shared = tmp_path / "shared-cache"
    extra = {a: ["--cache-dir", str(shared)] for a in FOUR}
    statuses: list[AgentStatus] = []
    with MosquittoBroker(tmp_path / "broker") as broker, agent_processes(tmp_path, data, extra=extra) as agents:
        watcher = MqttEndpoint("leave-watcher", broker.host, broker.port)
        watcher.start()
        watcher.subscribe(topics.agent_status(VICTIM))
        odd: dict[str, subprocess.Popen[bytes]] = {}
        try:
            thread, outcome = run_in_thread(config, tmp_path / "run", broker, agents)
            odd = {"bad": start_odd_agent(tmp_path, broker, "bad", malformed)}
            assert odd["bad"].wait(120) == 2  # EXIT_BAD_INPUT, before it ever contacted the coordinator
            bad_log = (tmp_path / "bad.log").read_text()
            assert "line 2: not valid JSON" in bad_log, bad_log
            wait_for(lambda: joined(tmp_path / "run") == len(FOUR), 300, "the four agents to join")
            odd["wrong"] = start_odd_agent(tmp_path, broker, "wrong", wrong_labels)  # joins between rounds

            def victim_training_round(round_id: int) -> bool:
                """The victim published "training" after round round_id - 1 was committed."""
                item = watcher.get(timeout=0.2)
                if item is not None and item.payload:
                    statuses.append(decode_message(item.payload, AgentStatus))
                    return (statuses[-1].state == "training" and _committed(tmp_path / "run") >= round_id - 1)
                return False

            wait_for(lambda: victim_training_round(2), 300, "the victim to train round 2")
            os.kill(agents.procs[VICTIM].pid, signal.SIGTERM)
            assert agents.procs[VICTIM].wait(30) == 6  # EXIT_STOPPED, after telling the coordinator
            summary = finish(thread, outcome, agents)
            assert odd["wrong"].wait(60) == 2
        finally:
            watcher.stop()
            for proc in odd.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)

    rows = agent_rows(tmp_path / "run")
    assert "bad" not in rows  # never joined: the coordinator never heard of it
    wrong_log = (tmp_path / "wrong.log").read_text()
    assert "'banana'" in wrong_log and "not labels of this run" in wrong_log, wrong_log
    assert "joined run" in wrong_log and "fetched" not in wrong_log  # left before downloading the bundle
    assert rows["wrong"][0] == "left"
    assert rows[VICTIM][0] == "left" and "SIGTERM" in rows[VICTIM][1], rows[VICTIM]
    assert summary["rounds"] == 2
    with sqlite3.connect(tmp_path / "run" / "coordinator.sqlite") as db:
        rounds = {r: f - s for r, s, f in db.execute("SELECT round_id, started, finished FROM rounds")}
    metrics = RunStore(tmp_path / "run").metrics()
    accepted = {r: {m.agent_id for m in metrics if m.round == r and m.accepted} for r in (1, 2)}
    # the shared cache: all four installed the same bundle at once and trained round 1
    assert accepted[1] == set(FOUR), accepted
    assert accepted[2] == set(FOUR) - {VICTIM}, accepted
    assert rounds[2] < config.round_timeout_s / 3, rounds  # dropped at once, not waited out
    installed = [p for p in (shared / "bundles").iterdir() if not p.name.startswith(".")]
    assert len(installed) == 2 and all((p / "manifest.json").exists() for p in installed), installed
    assert not [p for p in (shared / "bundles").iterdir() if p.name.endswith(".partial")]
    assert set(summary["final"]["agents"]) == set(FOUR) - {VICTIM}


def _committed(run_dir: Path) -> int:
    path = run_dir / "coordinator.sqlite"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        try:
            return int(db.execute("SELECT COALESCE(MAX(round_id), 0) FROM rounds").fetchone()[0])
        except sqlite3.OperationalError:
            return 0

