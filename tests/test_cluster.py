"""A clustered broker: broker lists, client failover, and a federation that survives the death of a cluster node.

- ``parse_broker_list``: what ``--broker`` accepts, with errors that say what is wrong.
- ``MqttEndpoint`` failover between two real mosquittos: the first reachable node is used, a killed node's clients
  move to the next one, subscriptions come back and a publish made during the cut arrives.
- A real two-node ejabberd cluster (tests/ejabberd_cluster.py, Debian's ejabberd): the coordinator on node A, two
  agents on A and two on B (each with the other node as fallback); node B is killed with SIGKILL as round 2 starts.
  The run completes all its rounds; B's agents fail over to A, say so in their logs and deliver updates through A.
Every process is ended by PID (agents, nodes, the cluster's own epmd).
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.broker import MosquittoBroker, parse_broker_address
from coordinator.observers import RoundEnded, RoundStarted, UpdateHandled
from coordinator.runner import build_bundles, run_federation
from coordinator.store import RunStore
from edge_agent.agent import EXIT_FINISHED
from edge_agent.cli import app as agent_app
from protocols.brokers import MAX_BROKERS, BrokerAddress, format_broker_list, parse_broker_list
from protocols.errors import BrokerUnavailable
from protocols.mqtt import DEFAULT_MAX_PAYLOAD, MqttEndpoint
from tests.ejabberd_cluster import EjabberdCluster, ejabberd_cluster, free_port
from tests.harness import AgentProcesses, agent_processes, fleet_data
from tests.test_faults import tiny_config

# ------------------------------------------------------------------------------------------- broker lists


def test_a_broker_list_parses_in_order_and_round_trips() -> None:
    parsed = parse_broker_list("10.0.0.1:1883, node-b.lan:8883,[::1]:1884")
    assert parsed == (BrokerAddress("10.0.0.1", 1883), BrokerAddress("node-b.lan", 8883), BrokerAddress("::1", 1884))
    assert format_broker_list(parsed) == "10.0.0.1:1883,node-b.lan:8883,[::1]:1884"
    assert parse_broker_list(format_broker_list(parsed)) == parsed
    assert parse_broker_list("127.0.0.1:1883") == (BrokerAddress("127.0.0.1", 1883),)
    assert parse_broker_address("[::1]:1884") == ("::1", 1884)  # the coordinator's single-address parser agrees


@pytest.mark.parametrize(("text", "says"), [
    ("", "no broker address given"),
    ("127.0.0.1:1883,", "entry 2 is empty"),
    ("127.0.0.1:1883,,10.0.0.2:1883", "entry 2 is empty"),
    ("127.0.0.1", "entry 1: invalid broker address '127.0.0.1'"),
    ("a:1883,b:0", "entry 2: invalid broker address 'b:0': port must be 1-65535"),
    ("a:1883,b:99999", "port must be 1-65535"),
    ("a:1883,b:http", "port must be 1-65535"),
    ("a:1883, :1883", "missing or bad host"),
    ("a b:1883", "missing or bad host"),
    ("::1:1883", "IPv6 host in brackets"),
    ("a:1883,a:1883", "a:1883 is named twice"),
    (",".join(f"n{i}:1883" for i in range(MAX_BROKERS + 1)), f"at most {MAX_BROKERS}"),
])
def test_a_bad_broker_list_is_refused_with_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_broker_list(text)


def test_edge_agent_join_refuses_a_bad_broker_list_before_doing_anything(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x", "label": 0}\n')
    result = CliRunner().invoke(agent_app, ["join", "--broker", "127.0.0.1:1883,,x:1", "--id", "a1", "--data",
                                            str(data), "--insecure-no-verify"])
    assert result.exit_code == 2, result.output
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # unwrap typer's error box
    assert "--broker" in text and "entry 2 is empty" in text, text


def test_the_run_directory_records_the_whole_list_for_a_resume(tmp_path: Path) -> None:
    from coordinator.run_broker import NoRecordedBroker, load_record, run_broker

    with run_broker(tmp_path / "broker", address="10.0.0.1:1883,10.0.0.2:1884", resume=False) as record:
        assert (record.host, record.port) == ("10.0.0.1", 1883)
        assert record.failover_brokers == (BrokerAddress("10.0.0.2", 1884),)
    again = load_record(tmp_path / "broker")
    assert again is not None and again.failover == ("10.0.0.2:1884",)
    with run_broker(tmp_path / "broker", address=None, resume=True) as resumed:  # --resume without --broker
        assert resumed.failover_brokers == (BrokerAddress("10.0.0.2", 1884),)
    damaged = (tmp_path / "broker" / "broker.json").read_text().replace("10.0.0.2:1884", "10.0.0.2:0")
    (tmp_path / "broker" / "broker.json").write_text(damaged)
    with pytest.raises(NoRecordedBroker, match="damaged"):
        load_record(tmp_path / "broker")


# ----------------------------------------------------------------------------------- endpoint failover


def test_the_endpoint_skips_a_dead_node_and_fails_over_when_its_node_dies(tmp_path: Path) -> None:
    """Start: the first node is down, the second is used. Then that node dies: the client moves to the third,
    restores its subscription there and a QoS 1 message published during the cut arrives."""
    dead = BrokerAddress("127.0.0.1", free_port())
    with MosquittoBroker(tmp_path / "m1") as m1, MosquittoBroker(tmp_path / "m2") as m2:
        nodes = [dead, BrokerAddress(m1.host, m1.port), BrokerAddress(m2.host, m2.port)]
        endpoint = MqttEndpoint("failover-client", dead.host, dead.port, failover=nodes[1:])
        watcher = MqttEndpoint("watcher", m2.host, m2.port)
        endpoint.subscribe("fl/v1/test/#")
        endpoint.start()
        watcher.start()
        watcher.subscribe("fl/v1/out")
        try:
            assert endpoint.address == str(nodes[1]) and endpoint.connected
            m1.stop()
            killed = time.monotonic()
            mid = endpoint.publish("fl/v1/out", b"sent during the cut")  # queued by paho, sent after the failover
            deadline = killed + 30
            while not (endpoint.connected and endpoint.address == str(nodes[2])) and time.monotonic() < deadline:
                time.sleep(0.05)
            failover_s = time.monotonic() - killed
            assert endpoint.address == str(nodes[2]) and endpoint.connected, endpoint.address
            assert endpoint.failovers >= 1
            assert endpoint.wait_published(mid, 10)
            got = watcher.get(timeout=10)
            assert got is not None and got.payload == b"sent during the cut"
            probe = MqttEndpoint("probe", m2.host, m2.port)
            probe.start()
            probe.wait_published(probe.publish("fl/v1/test/x", b"after"), 5)
            probe.stop()
            got = endpoint.get(timeout=10)
            assert got is not None and got.topic == "fl/v1/test/x", got  # the subscription came back on node 3
            print(f"\nfailover to the next mosquitto {failover_s:.1f} s after the kill")
            assert failover_s < 15
        finally:
            endpoint.stop()
            watcher.stop()


def test_an_unreachable_list_names_every_node_it_tried() -> None:
    nodes = [BrokerAddress("127.0.0.1", free_port()) for _ in range(2)]
    endpoint = MqttEndpoint("nobody", nodes[0].host, nodes[0].port, failover=nodes[1:])
    with pytest.raises(BrokerUnavailable) as info:
        endpoint.start(timeout=2)
    assert str(nodes[0]) in str(info.value) and str(nodes[1]) in str(info.value)


# ------------------------------------------------------------------------------ the ejabberd cluster run

FOUR = {"a1": "tiny-3", "a2": "tiny-3", "a3": "tiny-6", "a4": "tiny-6"}
ON_A, ON_B = ["a1", "a3"], ["a2", "a4"]  # each node holds one agent of each backbone
ROUNDS = 3


class NodeKiller:
    """Kills cluster node B (SIGKILL: a machine dying) the moment round 2 starts. Runs on the engine's thread."""

    def __init__(self, cluster: EjabberdCluster) -> None:
        self.cluster = cluster
        self.killed_at_unix = 0.0
        self.accepted: dict[int, set[str]] = {}

    def round_started(self, event: RoundStarted) -> None:
        if event.round_id == 2 and not self.killed_at_unix:
            self.cluster.kill(1)
            self.killed_at_unix = time.time()

    def update_handled(self, event: UpdateHandled) -> None:
        if event.outcome == "accepted":
            self.accepted.setdefault(event.round_id, set()).add(event.agent_id)

    def round_ended(self, event: RoundEnded) -> None:
        pass


def _log_time(line: str) -> float:
    stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def carries_the_largest_payload_across_nodes(cluster: EjabberdCluster, users: dict[str, str]) -> None:
    """A publish of DEFAULT_MAX_PAYLOAD bytes (the client's own limit) on node A reaches a subscriber on node B:
    the listener's max_payload_size leaves room for topic and properties (docs/deployment.md)."""
    node_a, node_b = cluster.nodes
    pub = MqttEndpoint("probe-a", "127.0.0.1", node_a.mqtt_port, username="a1", password=users["a1"])
    sub = MqttEndpoint("probe-b", "127.0.0.1", node_b.mqtt_port, username="a2", password=users["a2"])
    pub.start()
    sub.subscribe("fl/v1/blobs/+/+")
    sub.start()
    try:
        topic = "fl/v1/blobs/" + "0" * 64 + "/65535"
        assert pub.wait_published(pub.publish(topic, b"\x01" * DEFAULT_MAX_PAYLOAD), 20)
        got = sub.get(timeout=20)
        assert got is not None and len(got.payload) == DEFAULT_MAX_PAYLOAD
    finally:
        pub.stop()
        sub.stop()


def test_a_run_survives_the_death_of_a_cluster_node_and_its_agents_reconnect_to_the_other(tmp_path: Path) -> None:
    build_bundles(tiny_config(FOUR))  # export before the cluster and the clock start
    data = fleet_data(tmp_path, list(FOUR))
    users = {name: secrets.token_hex(12) for name in ["coordinator", *FOUR]}
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    for name, password in users.items():
        (secrets_dir / name).write_text(password)
        (secrets_dir / name).chmod(0o600)
    config = tiny_config(FOUR, rounds=ROUNDS, local_steps=20, min_fraction=0.5, round_timeout_s=60)
    started = time.monotonic()
    with ejabberd_cluster(tmp_path / "cluster", users=users) as cluster:
        node_a, node_b = cluster.nodes
        a_first, b_first = f"{node_a.address},{node_b.address}", f"{node_b.address},{node_a.address}"
        extra = {agent: ["--username", agent, "--password-file", str(secrets_dir / agent)] for agent in FOUR}
        carries_the_largest_payload_across_nodes(cluster, users)
        with agent_processes(tmp_path, data, extra=extra) as agents:
            killer = NodeKiller(cluster)

            def start(_host: str, _port: int, group: AgentProcesses = agents) -> None:
                group.start(_host, _port, ON_A, brokers=a_first)
                group.start(_host, _port, ON_B, brokers=b_first)

            outcome: dict[str, Any] = {}

            def target() -> None:
                try:
                    outcome["summary"] = run_federation(
                        config, tmp_path / "run", broker=a_first, start_agents=start, observers=[killer],
                        mqtt_options={"username": "coordinator", "password_file": secrets_dir / "coordinator"})
                except BaseException as exc:  # surfaced by the test
                    outcome["error"] = exc

            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            thread.join(240)
            assert not thread.is_alive(), "the run did not finish within 240 s"
            codes = agents.wait(30)
            logs = {agent: agents.full_log(agent) for agent in FOUR}
        cluster_seconds = cluster.started_seconds
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert killer.killed_at_unix, "node B was never killed"
    assert summary["rounds"] == ROUNDS and not summary["stopped"], summary

    failover_s = {}
    for agent in ON_B:  # each B agent lost B, moved to A, reconnected there and announced itself
        lines = logs[agent].splitlines()
        moved = [ln for ln in lines if f"cannot reach {node_b.address}; failing over to {node_a.address}" in ln]
        back = [ln for ln in lines if f"connected to {node_a.address}" in ln]
        assert moved and back, f"{agent} did not fail over to node A:\n{logs[agent][-3000:]}"
        failover_s[agent] = _log_time(back[0]) - killer.killed_at_unix
        assert 0 < failover_s[agent] < 30, failover_s
    for agent in ON_A:  # A's agents never noticed
        assert "failing over" not in logs[agent], logs[agent][-2000:]
    # after the kill, B's agents still delivered: round 3 was run entirely through node A
    metrics = RunStore(tmp_path / "run").metrics()
    accepted = {r: {m.agent_id for m in metrics if m.round == r and m.accepted} for r in range(1, ROUNDS + 1)}
    assert set(ON_B) <= accepted[1], accepted
    assert set(ON_B) <= accepted[ROUNDS], accepted
    assert codes == {agent: EXIT_FINISHED for agent in FOUR}, codes
    print(f"\ncluster up and joined in {cluster_seconds:.1f} s; node B killed as round 2 started; B agents back on "
          f"node A after {', '.join(f'{a} {s:.1f} s' for a, s in failover_s.items())}; accepted per round "
          f"{ {r: sorted(v) for r, v in accepted.items()} }; whole test {time.monotonic() - started:.0f} s")

