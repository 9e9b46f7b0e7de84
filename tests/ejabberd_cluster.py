"""A private ejabberd MQTT cluster for tests: N nodes on loopback, their own EPMD, configs, spool and logs.

ejabberd (Debian's package, installed by scripts/setup.sh without starting its system service) speaks MQTT 5 through
mod_mqtt and clusters over Erlang distribution (mnesia). Nothing here touches a system ejabberd, epmd or port:
- an own ``epmd`` on a free loopback port (ERL_EPMD_PORT) so node names never meet another VM's;
- every node runs ``erl ... -s ejabberd`` directly (not ``ejabberdctl start``, which needs root or the ejabberd
  user) with its own ejabberd.yml, mnesia spool and log directory under the test's directory;
- admin commands go through ``ejabberd_ctl`` (what ``ejabberdctl`` runs) in a short-lived hidden node.
Every process is ended by its PID: nodes with ``stop`` (SIGKILL if that hangs), then the own epmd.

The node configuration is the one docs/deployment.md quotes (``node_config``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from protocols.mqtt import DEFAULT_MAX_PAYLOAD

SESSION_EXPIRY_S = 3600  # what agents ask for (edge_agent/agent.py); ejabberd caps a client's request at this
# mod_mqtt's max_payload_size counts more than the payload (1 MiB - 4 KiB passed, 1 MiB did not): room for the
# topic and properties on top of the largest payload our clients send.
MAX_PAYLOAD_SIZE = DEFAULT_MAX_PAYLOAD + 64 * 1024
MAX_QUEUE = 10000  # messages kept for one offline persistent session (a bundle is ~300 chunks)
XMPP_HOST = "localhost"  # the ejabberd virtual host MQTT users belong to


class EjabberdMissing(RuntimeError):
    """ejabberd or Erlang is not installed here."""


def find_ejabberd() -> tuple[str, str, str]:
    """(erl, epmd, ERL_LIBS directory holding ejabberd-*/ebin) of the installed ejabberd."""
    erl, epmd = shutil.which("erl"), shutil.which("epmd")
    beams = sorted(glob.glob("/usr/lib/*/ejabberd-*/ebin/ejabberd.beam") + glob.glob("/usr/lib/ejabberd-*/ebin/"
                                                                                    "ejabberd.beam"))
    if erl is None or epmd is None or not beams:
        raise EjabberdMissing("ejabberd is not installed: run scripts/setup.sh (it installs Debian's ejabberd "
                              "without starting its service), or `apt-get install ejabberd`")
    return erl, epmd, str(Path(beams[-1]).parent.parent.parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_config(mqtt_port: int) -> str:
    """ejabberd.yml of one node: MQTT 5 on loopback only, no XMPP/HTTP listeners, sizes our protocol needs."""
    return f"""hosts:
  - {XMPP_HOST}
loglevel: info
log_rotate_count: 0
listen:
  -
    port: {mqtt_port}
    ip: "127.0.0.1"
    module: mod_mqtt
    backlog: 1000
    max_payload_size: {MAX_PAYLOAD_SIZE}
auth_method: internal
auth_password_format: scram
modules:
  mod_mqtt:
    session_expiry: {SESSION_EXPIRY_S}
    max_queue: {MAX_QUEUE}
    match_retained_limit: infinity
"""


@dataclass
class Node:
    name: str
    mqtt_port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.mqtt_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EjabberdCluster:
    """N ejabberd nodes joined into one cluster; ``users`` (name -> password) may log in over MQTT."""

    def __init__(self, workdir: Path, *, nodes: int = 2, users: Mapping[str, str] | None = None) -> None:
        self.erl, self.epmd_exe, self.erl_libs = find_ejabberd()
        self.workdir = workdir
        self.users = dict(users or {})
        self.cookie = secrets.token_hex(16)
        self.epmd_port = free_port()
        self.epmd: subprocess.Popen[bytes] | None = None
        tag = secrets.token_hex(3)
        self.nodes = [Node(f"ht{i + 1}x{tag}@localhost", free_port(), workdir / f"node{i + 1}") for i in range(nodes)]
        self.started_seconds = 0.0

    # ------------------------------------------------------------------------------------------ processes

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {**os.environ, "ERL_EPMD_PORT": str(self.epmd_port), "ERL_EPMD_ADDRESS": "127.0.0.1",
               "ERL_LIBS": self.erl_libs, "HOME": str(self.workdir)}
        if node is not None:
            env.update(EJABBERD_CONFIG_PATH=str(node.directory / "ejabberd.yml"),
                       EJABBERD_LOG_PATH=str(node.directory / "log" / "ejabberd.log"),
                       ERL_CRASH_DUMP=str(node.directory / "log" / "erl_crash.dump"))
        return env

    def _erl_args(self, name: str) -> list[str]:
        return [self.erl, "-sname", name, "-setcookie", self.cookie, "-noinput", "-noshell",
                "-kernel", "inet_dist_use_interface", "{127,0,0,1}"]

    def start(self, timeout: float = 150.0) -> None:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        epmd_log = open(self.workdir / "epmd.log", "ab")  # noqa: SIM115 - the child holds it
        self.epmd = subprocess.Popen([self.epmd_exe, "-address", "127.0.0.1", "-port", str(self.epmd_port)],
                                     stdout=epmd_log, stderr=subprocess.STDOUT, env=self._env())
        epmd_log.close()
        _wait_port(self.epmd_port, 20, "the cluster's own epmd")
        for node in self.nodes:
            shutil.rmtree(node.directory / "spool", ignore_errors=True)  # a stale mnesia schema names other nodes
            (node.directory / "spool").mkdir(parents=True)
            (node.directory / "log").mkdir(parents=True, exist_ok=True)
            (node.directory / "ejabberd.yml").write_text(node_config(node.mqtt_port), encoding="utf-8")
            self._launch(node)
        for node in self.nodes:
            _wait_port(node.mqtt_port, max(10.0, timeout - (time.monotonic() - t0)), f"ejabberd node {node.name}",
                       node.proc)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "join_cluster", first.name, timeout=120)
        for node in self.nodes[1:]:  # join restarts the joining node's ejabberd application
            _wait_port(node.mqtt_port, 60, f"ejabberd node {node.name} after joining", node.proc)
        members = self.ctl(first, "list_cluster")
        missing = [n.name for n in self.nodes if n.name not in members]
        if missing:
            raise RuntimeError(f"nodes {missing} did not join the cluster; list_cluster said: {members!r}")
        for user, password in self.users.items():
            self.ctl(first, "register", user, XMPP_HOST, password)
        self.started_seconds = time.monotonic() - t0

    def _launch(self, node: Node) -> None:
        out = open(node.directory / "log" / "stdout.log", "ab")  # noqa: SIM115 - the child holds it
        node.proc = subprocess.Popen(
            [*self._erl_args(node.name), "+K", "true", "-mnesia", "dir", f'"{node.directory / "spool"}"',
             "-s", "ejabberd"], stdout=out, stderr=subprocess.STDOUT, env=self._env(node), cwd=node.directory)
        out.close()

    def ctl(self, node: Node, *command: str, timeout: float = 60) -> str:
        """Run one ejabberdctl command against ``node`` (as ejabberdctl does: a hidden node calling ejabberd_ctl)."""
        args = [*self._erl_args(f"ctl{secrets.token_hex(4)}"), "-hidden", "-s", "ejabberd_ctl", "-extra",
                node.name, "--no-timeout", *command]  # bounded by ``timeout`` here, not by ejabberd_ctl's 60 s
        done = subprocess.run(args, capture_output=True, env=self._env(), timeout=timeout, cwd=self.workdir)
        text = (done.stdout + done.stderr).decode("utf-8", "replace")
        if done.returncode != 0:
            raise RuntimeError(f"ejabberdctl {' '.join(command)} on {node.name} failed ({done.returncode}): {text}")
        return text

    def kill(self, index: int) -> float:
        """SIGKILL one node (a machine dying: no goodbye to clients or peers); returns when it happened."""
        node = self.nodes[index]
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)
        return time.monotonic()

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                with contextlib.suppress(Exception):
                    self.ctl(node, "stop", timeout=30)
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                try:
                    node.proc.wait(20)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(10)
        if self.epmd is not None and self.epmd.poll() is None:  # ours: started in start() on a private port
            self.epmd.terminate()
            try:
                self.epmd.wait(10)
            except subprocess.TimeoutExpired:
                self.epmd.kill()
                self.epmd.wait(10)

    def log(self, index: int) -> str:
        path = self.nodes[index].directory / "log" / "ejabberd.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _wait_port(port: int, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g} s")


@contextlib.contextmanager
def ejabberd_cluster(workdir: Path, **kwargs: object) -> Iterator[EjabberdCluster]:
    cluster = EjabberdCluster(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
