"""The provisioned fleet, as a real deployment runs it: `coordinator provision` writes the set-up, mosquitto runs
with exactly the mosquitto.conf it wrote (`mosquitto -c DIR/broker/mosquitto.conf`), and a coordinator and three
agents, all separate processes, complete a federation over TLS with passwords, and again with client certificates.

Then what the broker must refuse on that config: outsiders neither read retained state nor publish, a device
writes no other device's topics and reads no other device's inbox, a device connecting with another's client id
does not kick it off, and no plaintext listener is open.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.broker import ConfiguredMosquitto, listeners_of, probe_mqtt
from coordinator.cli import app
from coordinator.provision import COORDINATOR_USER, Provisioned, provision
from coordinator.store import RunStore
from protocols import topics
from protocols.errors import BrokerUnavailable
from protocols.mqtt import MqttEndpoint
from tests.harness import agent_processes, assert_rounds_follow_the_rule, fleet_data

AGENTS = ["a1", "a2", "a3"]
PINS = {agent: "tiny-3" for agent in AGENTS}
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def provision_cli(directory: Path, *extra: str) -> tuple[Path, int]:
    """`coordinator provision` as a user runs it; returns (its directory, the TLS port)."""
    port = free_port()
    agents = [word for agent in AGENTS for word in ("--agent", agent)]
    result = CliRunner().invoke(app, ["provision", "--out", str(directory), *agents, "--tls-port", str(port), *extra])
    assert result.exit_code == 0, result.output
    assert f"mosquitto -c {directory.resolve() / 'broker' / 'mosquitto.conf'}" in result.output
    return directory.resolve(), port


def listening_ports(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on, read from /proc (no connection needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            address_hex, port_hex = cols[1].split(":")
            if width == 8:
                address = socket.inet_ntop(socket.AF_INET, bytes.fromhex(address_hex)[::-1])
            else:
                raw = bytes.fromhex(address_hex)
                address = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            found.add((address, int(port_hex, 16)))
    return found


def write_run_config(path: Path, rounds: int = 3) -> Path:
    path.write_text(
        f'run_name = "provisioned"\nbackbones = ["tiny-3"]\nrounds = {rounds}\nlocal_steps = 10\n'
        f"min_agents = {len(AGENTS)}\nround_timeout_s = 120\njoin_timeout_s = 180\nlearning_rate = 0.005\n"
        '[task]\nmax_length = 32\nbatch_size = 8\n[pinned]\n' + "".join(f'{a} = "{b}"\n' for a, b in PINS.items()))
    return path


def run_provisioned_federation(tmp: Path, security: Path, port: int, *, client_certs: bool) -> Path:
    """Coordinator and agents as processes with the credentials `coordinator provision` wrote for each of them."""
    def auth(user: str) -> list[str]:
        party = security / (COORDINATOR_USER if user == COORDINATOR_USER else f"agents/{user}")
        # the run key provision wrote: the coordinator signs with it, each device verifies with its own copy
        trust = (["--signing-key", str(security / "run-key" / "run-key")] if user == COORDINATOR_USER
                 else ["--coordinator-key", str(party / "run-key.pub")])
        if client_certs:  # no username, no password: the broker takes the identity from the certificate's CN
            return ["--tls-ca", str(party / "ca.crt"), "--tls-cert", str(party / "client.crt"),
                    "--tls-key", str(party / "client.key"), *trust]
        return ["--tls-ca", str(party / "ca.crt"), "--username", user, "--password-file", str(party / "password"),
                *trust]

    data = fleet_data(tmp, AGENTS, per_client=60)
    run_dir = tmp / "run"
    with ConfiguredMosquitto(security / "broker" / "mosquitto.conf", HOST, port), \
            agent_processes(tmp, data, extra={a: auth(a) for a in AGENTS}) as agents:
        log = tmp / "coordinator.log"
        with open(log, "ab") as handle:
            coordinator = subprocess.Popen(
                [sys.executable, "-m", "coordinator.cli", "run", "--config", str(write_run_config(tmp / "run.toml")),
                 "--broker", f"{HOST}:{port}", "--out", str(run_dir), *auth(COORDINATOR_USER)],
                stdout=handle, stderr=subprocess.STDOUT)
        try:
            agents.start(HOST, port)
            assert coordinator.wait(600) == 0, log.read_text()[-3000:]
            codes = agents.wait(120)
            assert set(codes.values()) == {0}, {a: agents.log(a) for a in codes}
        finally:
            if coordinator.poll() is None:
                coordinator.kill()
                coordinator.wait(10)
    return run_dir


def assert_complete_federation(run_dir: Path) -> None:
    store = RunStore(run_dir)
    try:
        rows, last = store.metrics(), store.last_round()
    finally:
        store.close()
    assert last == 3
    for round_id in (1, 2, 3):
        assert {r.agent_id for r in rows if r.round == round_id and r.accepted} == set(AGENTS), rows
    assert_rounds_follow_the_rule(run_dir, PINS)


def test_provisioned_fleet_completes_a_run_over_tls_with_passwords(tmp_path: Path) -> None:
    security, port = provision_cli(tmp_path / "security")
    run_dir = run_provisioned_federation(tmp_path, security, port, client_certs=False)
    assert_complete_federation(run_dir)
    log = (security / "broker" / "mosquitto.log").read_text()
    for user in (COORDINATOR_USER, *AGENTS):
        assert f"as {user} (p5" in log and f"u'{user}'" in log  # each party authenticated as itself over TLS


def test_provisioned_fleet_completes_a_run_with_client_certificates(tmp_path: Path) -> None:
    security, port = provision_cli(tmp_path / "security", "--client-certs")
    config = (security / "broker" / "mosquitto.conf").read_text()
    assert "require_certificate true" in config and "use_identity_as_username true" in config
    run_dir = run_provisioned_federation(tmp_path, security, port, client_certs=True)
    assert_complete_federation(run_dir)
    log = (security / "broker" / "mosquitto.log").read_text()
    for user in AGENTS:
        assert f"u'{user}'" in log  # the username is the certificate's CN; no password was sent


# --- what the provisioned broker refuses ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Provisioned, ConfiguredMosquitto]]:
    tmp = tmp_path_factory.mktemp("provisioned")
    creds = provision(tmp / "security", ["a1", "a2"], tls_port=free_port())
    with ConfiguredMosquitto(creds.config_path, HOST, creds.tls_port) as broker:
        yield creds, broker


def client(creds: Provisioned, user: str, *, client_id: str | None = None, password: str | None = None,
           start: bool = True) -> MqttEndpoint:
    endpoint = MqttEndpoint(client_id or user, HOST, creds.tls_port, username=user,
                            password=password if password is not None else creds.passwords[user],
                            tls_ca=str(creds.party_dir(user) / "ca.crt"),
                            clean_start=True, keepalive=10)
    if start:
        endpoint.start(timeout=5)
    return endpoint


def test_every_agent_reads_the_broadcast_topics(fleet: tuple[Provisioned, ConfiguredMosquitto]) -> None:
    """The bug the issue found: the broadcast reads fell under `user coordinator`, so no agent could join."""
    creds, _ = fleet
    coordinator = client(creds, COORDINATOR_USER)
    blob = topics.blob_chunk("ab" * 32, 0)
    try:
        for topic in (topics.coord_status(), blob):
            assert coordinator.wait_published(coordinator.publish(topic, b"retained " + topic.encode(), retain=True), 5)
        for agent in ("a1", "a2"):
            endpoint = client(creds, agent)
            try:
                endpoint.subscribe(topics.coord_status())
                endpoint.subscribe(topics.blob_filter("ab" * 32))
                got = {m.topic for m in (endpoint.get(timeout=5), endpoint.get(timeout=5)) if m is not None}
                assert got == {topics.coord_status(), blob}, (agent, got)
            finally:
                endpoint.stop()
    finally:
        for topic in (topics.coord_status(), blob):
            coordinator.wait_published(coordinator.publish(topic, b"", retain=True), 5)
        coordinator.stop()


def outsiders(creds: Provisioned) -> list[MqttEndpoint]:
    """Anonymous, a made-up user, and a real user with a wrong password, all over TLS with the right CA."""
    ca = str(creds.config_path.parent / "ca.crt")
    return [MqttEndpoint(f"outsider-{i}", HOST, creds.tls_port, username=user, password=password, tls_ca=ca,
                         clean_start=True)
            for i, (user, password) in enumerate([(None, None), ("mallory", "guess"), ("a1", "wrong")])]


def test_outsider_cannot_read(fleet: tuple[Provisioned, ConfiguredMosquitto]) -> None:
    creds, _ = fleet
    coordinator = client(creds, COORDINATOR_USER)
    try:
        assert coordinator.wait_published(coordinator.publish(topics.coord_status(), b"secret state", retain=True), 5)
        for outsider in outsiders(creds):
            outsider.subscribe("#")
            with pytest.raises(BrokerUnavailable, match="refused"):
                outsider.start(timeout=5)
            assert outsider.drain() == []
            outsider.stop()
    finally:
        coordinator.wait_published(coordinator.publish(topics.coord_status(), b"", retain=True), 5)
        coordinator.stop()


def test_outsider_cannot_publish(fleet: tuple[Provisioned, ConfiguredMosquitto]) -> None:
    creds, _ = fleet
    coordinator = client(creds, COORDINATOR_USER)
    try:
        coordinator.subscribe(topics.agents_filter("join"))
        coordinator.subscribe(topics.agents_filter("report"))
        for outsider in outsiders(creds):
            with pytest.raises(BrokerUnavailable, match="refused"):
                outsider.start(timeout=5)
            outsider.stop()
        # A raw MQTT CONNECT + PUBLISH without TLS on the TLS port is not even an MQTT session.
        assert not probe_mqtt(HOST, creds.tls_port, timeout=2, require_success=False)
        time.sleep(0.5)
        assert coordinator.drain() == []
    finally:
        coordinator.stop()


def test_device_cannot_write_other_device_topics(fleet: tuple[Provisioned, ConfiguredMosquitto]) -> None:
    creds, _ = fleet
    coordinator, a1 = client(creds, COORDINATOR_USER), client(creds, "a1")
    try:
        for kind in ("join", "report", "request", "status"):
            coordinator.subscribe(topics.agents_filter(kind))
        coordinator.subscribe(topics.update_filter())
        coordinator.subscribe(topics.coord_status())
        coordinator.subscribe("fl/v1/agents/+/inbox")
        forged = [topics.agent_join("a2"), topics.agent_report("a2"), topics.agent_request("a2"),
                  topics.agent_status("a2"), topics.agent_update_chunk("a2", 1), topics.agent_inbox("a2"),
                  topics.coord_status(), topics.blob_chunk("cd" * 32, 0)]
        for topic in forged:
            assert not a1.wait_published(a1.publish(topic, b'{"forged": true}'), 5), f"broker accepted {topic}"
        own = topics.agent_report("a1")
        assert a1.wait_published(a1.publish(own, b'{"own": true}'), 5)
        received = [m.topic for m in (coordinator.get(timeout=3), coordinator.get(timeout=1)) if m is not None]
        assert received == [own], received
        assert a1.connected
    finally:
        a1.stop()
        coordinator.stop()


def test_device_cannot_read_other_device_inbox(fleet: tuple[Provisioned, ConfiguredMosquitto]) -> None:
    creds, _ = fleet
    coordinator, a1, a2 = client(creds, COORDINATOR_USER), client(creds, "a1"), client(creds, "a2")
    try:
        a1.subscribe(topics.agent_inbox("a2"))  # SUBACK may grant it; delivery is what the ACL filters
        a1.subscribe("fl/v1/#")
        a2.subscribe(topics.agent_inbox("a2"))
        a2.subscribe(topics.agent_report("a2"))  # write-only for a2 itself; nobody but the coordinator reads it
        coordinator.wait_published(coordinator.publish(topics.agent_inbox("a2"), b"for a2 only"), 5)
        got = a2.get(timeout=5)
        assert got is not None and got.payload == b"for a2 only"
        time.sleep(0.5)
        assert a1.drain() == []
    finally:
        for endpoint in (a1, a2, coordinator):
            endpoint.stop()


def test_client_id_reuse_does_not_kick(fleet: tuple[Provisioned, ConfiguredMosquitto]) -> None:
    """a2 connects with client id "a1": with use_username_as_clientid on the listener the broker uses "a2" as its
    client id, so a1 keeps its connection and its inbox, and a2 still gets only a2's rights."""
    creds, _ = fleet
    coordinator, a1 = client(creds, COORDINATOR_USER), client(creds, "a1")
    imposter = client(creds, "a2", client_id="a1")
    try:
        a1.subscribe(topics.agent_inbox("a1"))
        imposter.subscribe(topics.agent_inbox("a1"))
        time.sleep(1.0)
        assert a1.connected and imposter.connected
        coordinator.wait_published(coordinator.publish(topics.agent_inbox("a1"), b"for a1"), 5)
        got = a1.get(timeout=5)
        assert got is not None and got.payload == b"for a1"
        assert imposter.drain() == []
        assert not imposter.wait_published(imposter.publish(topics.agent_report("a1"), b"{}"), 5)
        log = (creds.config_path.parent / "mosquitto.log").read_text()
        assert "already connected, closing old connection" not in log
    finally:
        for endpoint in (imposter, a1, coordinator):
            endpoint.stop()


def test_no_plaintext_listener(fleet: tuple[Provisioned, ConfiguredMosquitto]) -> None:
    """The broker listens on exactly the TLS port (no default 1883 listener), and that port speaks only TLS."""
    creds, broker = fleet
    assert broker.pid is not None
    assert listeners_of(creds.config_path.read_text()) == [(creds.tls_port, HOST)]
    assert listening_ports(broker.pid) == {(HOST, creds.tls_port)}
    for port in {p for _, p in listening_ports(broker.pid)}:
        assert not probe_mqtt(HOST, port, timeout=2, require_success=False), f"plaintext MQTT answered on {port}"


def test_plaintext_listener_only_on_loopback_when_asked(tmp_path: Path) -> None:
    tls_port, plain_port = free_port(), free_port()
    creds = provision(tmp_path / "security", ["a1"], tls_port=tls_port, bind="0.0.0.0", plain_port=plain_port)
    assert listeners_of(creds.config_path.read_text()) == [(tls_port, "0.0.0.0"), (plain_port, "127.0.0.1")]
    with ConfiguredMosquitto(creds.config_path, HOST, tls_port) as broker:
        assert broker.pid is not None
        assert listening_ports(broker.pid) == {("0.0.0.0", tls_port), ("127.0.0.1", plain_port)}
        anonymous = MqttEndpoint("anon", HOST, plain_port, clean_start=True)
        with pytest.raises(BrokerUnavailable, match="refused"):
            anonymous.start(timeout=5)
        anonymous.stop()
        a1 = MqttEndpoint("a1", HOST, plain_port, username="a1", password=creds.passwords["a1"], clean_start=True)
        a1.start(timeout=5)
        a1.stop()


def test_provisioned_files_keep_secrets_apart(tmp_path: Path) -> None:
    """The CA key is 0600 in its own directory, not beside the broker's files; secrets are 0600."""
    creds = provision(tmp_path / "security", ["a1"], tls_port=free_port(), client_certs=True)
    root = creds.directory
    broker_files = {p.name for p in (root / "broker").iterdir()}
    assert "ca.key" not in broker_files and {"ca.crt", "server.crt", "server.key", "mosquitto.conf"} <= broker_files
    assert not any(p.name == "ca.key" for p in root.rglob("*") if p.parent != root / "ca")
    for path in (root / "ca" / "ca.key", root / "broker" / "server.key", root / "broker" / "passwd",
                 root / "agents" / "a1" / "password", root / "agents" / "a1" / "client.key",
                 root / "coordinator" / "password"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    for directory in (root, root / "ca", root / "broker", root / "agents" / "a1"):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    config = creds.config_path.read_text()
    first_listener = config.index("\nlistener ")
    for option in ("per_listener_settings", "allow_anonymous false", "password_file", "acl_file"):
        assert config.index(option) < first_listener, option
    assert config.index("use_username_as_clientid") > first_listener


def test_coordinator_broker_runs_exactly_the_provisioned_config(tmp_path: Path) -> None:
    """`coordinator broker --config DIR` is `mosquitto -c DIR/broker/mosquitto.conf` in place (same PID)."""
    creds = provision(tmp_path / "security", ["a1"], tls_port=free_port())
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "broker", "--config", str(creds.directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not listening_ports(proc.pid):  # python until the exec, then mosquitto opening its listener
            assert proc.poll() is None and time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.1)
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[1:3] == [
            b"-c", str(creds.config_path).encode()]
        assert listening_ports(proc.pid) == {(HOST, creds.tls_port)}
        a1 = MqttEndpoint("a1", HOST, creds.tls_port, username="a1", password=creds.passwords["a1"],
                          tls_ca=str(creds.party_dir("a1") / "ca.crt"), clean_start=True)
        a1.start(timeout=5)
        a1.stop()
    finally:
        proc.terminate()
        proc.wait(10)


def test_password_files_must_be_private_and_non_empty(tmp_path: Path) -> None:
    from protocols.credentials import CredentialError, read_password_file, resolve_password

    path = tmp_path / "password"
    path.write_text("s3cret\n")
    path.chmod(0o600)
    assert read_password_file(path) == "s3cret"
    assert resolve_password(None, path) == "s3cret"
    path.chmod(0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        read_password_file(path)
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(CredentialError, match="empty"):
        read_password_file(path)
    with pytest.raises(CredentialError, match="cannot read"):
        read_password_file(tmp_path / "missing")
