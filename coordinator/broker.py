"""Run a private mosquitto for the coordinator, the demo and the test suite.

Our own process with our own config on a free loopback port: a developer machine often already runs
a system mosquitto on 1883 with unknown settings, and the settings matter (TCP_NODELAY, packet and
inflight limits; reference/mqtt.md §2.1, §8). Readiness is a real CONNECT/CONNACK, because the TCP
port accepts before the broker is ready to serve.
"""

from __future__ import annotations

import contextlib
import getpass
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from protocols.brokers import parse_broker_address as _parse_one

SBIN_DIRS = "/usr/local/sbin:/usr/sbin:/sbin:/opt/homebrew/sbin:/usr/local/opt/mosquitto/sbin"
DEFAULT_HOST = "127.0.0.1"
_START_ATTEMPTS = 3
_STOP_GRACE_SECONDS = 5.0


class MosquittoNotFound(FileNotFoundError):
    """The mosquitto binary is not installed (or not where we look)."""


class BrokerStartError(RuntimeError):
    """mosquitto was found but did not come up."""


def find_mosquitto() -> str:
    """Locate the binary; Debian puts it in /usr/sbin, which is often not on a normal user's PATH."""
    exe = shutil.which("mosquitto") or shutil.which("mosquitto", path=SBIN_DIRS)
    if exe is None:
        raise MosquittoNotFound(
            "mosquitto is not installed (looked on PATH and in "
            f"{SBIN_DIRS}); install it with `sudo apt-get install -y mosquitto` (macOS: `brew install "
            "mosquitto`) or point --broker at an existing MQTT v5 broker"
        )
    return exe


def parse_broker_address(address: str) -> tuple[str, int]:
    """Parse one ``HOST:PORT`` (IPv6 as ``[::1]:1883``) as given on a command line (protocols/brokers.py)."""
    parsed = _parse_one(address)
    return parsed.host, parsed.port


def is_loopback(host: str) -> bool:
    """True if ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listeners_of(config: str) -> list[tuple[int, str | None]]:
    """The (port, bind address or None for every interface) of each listener a mosquitto.conf opens, including the
    default listener (1883, every interface) that listener options given before the first ``listener`` open."""
    found: list[tuple[int, str | None]] = []
    default_opened = False
    listener_only = {"use_username_as_clientid", "cafile", "capath", "certfile", "keyfile", "require_certificate",
                     "use_identity_as_username", "use_subject_as_username", "protocol", "bind_address",
                     "bind_interface", "port", "max_connections", "mount_point", "socket_domain", "tls_version",
                     "ciphers", "psk_hint", "http_dir", "crlfile", "dhparamfile", "tls_engine", "tls_keyform"}
    for raw in config.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "listener" and len(words) >= 2:
            found.append((int(words[1]), words[2] if len(words) >= 3 else None))
        elif not found and words[0] in listener_only:
            default_opened = True
    if default_opened:
        found.insert(0, (1883, None))
    return found


def _process_alive(pid: int) -> bool:
    """Running (not a zombie) on this machine."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            state = handle.read().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def mosquitto_pid_running(pid: int, config_path: Path) -> bool:
    """True if ``pid`` is alive and is a mosquitto started with exactly this config file: a PID recorded in a run
    directory may have been reused by an unrelated process since, and that one must never be signalled."""
    if pid <= 0 or not _process_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        given = Path(os.fsdecode(argv[-1]))
        if not given.is_absolute():  # a broker started with a relative -c (before 2026-12-06): from its own cwd
            given = Path(os.readlink(f"/proc/{pid}/cwd")) / given
    except (OSError, IndexError):
        return False
    return (len(argv) >= 3 and Path(os.fsdecode(argv[0])).name == "mosquitto"
            and os.fsdecode(argv[-2]) == "-c" and os.path.normpath(given) == os.path.normpath(config_path))


def stop_pid(pid: int, config_path: Path, grace: float = 5.0) -> bool:
    """SIGTERM (persistence saved) a mosquitto we started from ``config_path`` but that is not our child (e.g.
    started by a coordinator that was killed); SIGKILL after ``grace``. False if it was not running."""
    if not mosquitto_pid_running(pid, config_path):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _process_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + grace
        time.sleep(0.05)
    return True


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def probe_mqtt(host: str, port: int, timeout: float = 1.0, *, require_success: bool = True) -> bool:
    """True if an MQTT v5 CONNECT to host:port gets a CONNACK within ``timeout``.

    With ``require_success=False`` any CONNACK counts, e.g. "not authorized" from a broker that admits only
    provisioned users: it is up and serving, which is all readiness means."""
    try:
        socket.create_connection((host, port), timeout=min(timeout, 0.2)).close()
    except OSError:
        return False
    ok = threading.Event()

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        if not (require_success and reason_code.is_failure):
            ok.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=5)
        client.loop_start()
        return ok.wait(timeout)
    except OSError:
        return False
    finally:
        client.disconnect()  # before loop_stop, else loop_stop waits ~1 s (§9.2)
        client.loop_stop()


class ConfiguredMosquitto:
    """``mosquitto -c CONFIG`` with a config file used exactly as written, never rewritten: a provisioned broker
    (`coordinator provision`) or a resumed run's broker. Readiness is the TCP accept of ``port`` (a TLS or
    client-certificate listener cannot be probed with an anonymous CONNECT)."""

    def __init__(self, config_path: Path, host: str, port: int) -> None:
        self.config_path = Path(config_path).resolve()
        self.host, self.port = host, port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        exe = find_mosquitto()
        out_path = self.config_path.parent / "mosquitto.out"
        with open(out_path, "ab") as out:
            self._proc = subprocess.Popen([exe, "-c", str(self.config_path)], stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        # Every listener the config opens (mosquitto opens them one after the other), else the one we were told.
        wanted = {(self._probe_host(bind), port) for port, bind in listeners_of(self.config_path.read_text())}
        waiting = wanted or {(self._probe_host(self.host), self.port)}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                tail = out_path.read_text(errors="replace").splitlines()[-10:]
                raise BrokerStartError(f"mosquitto -c {self.config_path} exited with code {code}:\n"
                                       + "\n".join(tail) + "\nfix the config or free the port")
            for target in list(waiting):
                try:
                    socket.create_connection(target, timeout=0.2).close()
                    waiting.discard(target)
                except OSError:
                    pass
            if not waiting:
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerStartError(f"mosquitto -c {self.config_path} did not listen on {sorted(waiting)} within "
                               f"{timeout:g} s")

    @staticmethod
    def _probe_host(bind: str | None) -> str:
        return DEFAULT_HOST if bind in (None, "", "0.0.0.0") else ("::1" if bind == "::" else bind)

    def stop(self) -> None:
        if self._proc is not None:
            MosquittoBroker._terminate(self._proc)
            self._proc = None

    def __enter__(self) -> ConfiguredMosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MosquittoBroker:
    """A mosquitto child process that this object alone owns and stops (by PID)."""

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        port: int | None = None,
        host: str = DEFAULT_HOST,
        extra: str = "",
        persistence: bool = False,
    ) -> None:
        self._owned_tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._owned_tmp = tempfile.TemporaryDirectory(prefix="heterotune-mosquitto-")
            workdir = self._owned_tmp.name
        # Absolute: the config's paths (log, persistence) and the ``-c`` argument must name the same files from any
        # working directory, so that a resume started elsewhere (or with a relative --out) finds this broker again.
        self._workdir = Path(workdir).resolve()
        self._host = host
        self._requested_port = port
        self._port: int | None = port
        self._extra = extra
        self._persistence = persistence
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------------------ properties

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the broker has no port yet; call start() first")
        return self._port

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self._workdir / "mosquitto.log"

    @property
    def config_path(self) -> Path:
        return self._workdir / "mosquitto.conf"

    # ------------------------------------------------------------------------------- lifecycle

    def config_text(self, port: int) -> str:
        lines = [
            f"user {getpass.getuser()}",  # else root drops to 'mosquitto' and cannot read 0700 dirs
            f"listener {port} {self._host}",
            "allow_anonymous true",  # 2.0 defaults to false once a listener is configured
            "set_tcp_nodelay true",
            "max_packet_size 2097152",
            "max_inflight_messages 4",
            "max_queued_messages 20000",
            "persistent_client_expiration 2d",
            f"log_dest file {self.log_path}",
        ]
        if self._persistence:
            lines += [
                "persistence true",
                f"persistence_location {self._workdir / 'persistence'}/",
                "autosave_interval 30",
            ]
        return "\n".join(lines) + "\n" + (self._extra.rstrip("\n") + "\n" if self._extra else "")

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until it answers CONNECT; retry on a lost race for a free port."""
        if self.running:
            return
        exe = find_mosquitto()
        self._workdir.mkdir(parents=True, exist_ok=True)
        if self._persistence:
            (self._workdir / "persistence").mkdir(exist_ok=True)
        failures: list[str] = []
        for _ in range(_START_ATTEMPTS):
            port = self._port if self._port is not None else _free_port(self._host)
            self.config_path.write_text(self.config_text(port))
            with open(self._workdir / "mosquitto.out", "ab") as out:
                proc = subprocess.Popen(
                    [exe, "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C for the coordinator must not kill it first
                )
            failure = self._wait_ready(proc, port, timeout)
            if failure is None:
                self._proc, self._port = proc, port
                return
            failures.append(f"port {port}: {failure}")
            self._terminate(proc)
            if self._requested_port is None:
                self._port = None
        raise BrokerStartError(
            f"mosquitto did not start after {_START_ATTEMPTS} attempts ({'; '.join(failures)}). "
            f"Log tail:\n{self._log_tail()}\nCheck {self.config_path}; if the port is taken, omit it to "
            "get a free one"
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"exited with code {proc.returncode}"
            if probe_mqtt(self._host, port, timeout=min(1.0, max(0.05, deadline - time.monotonic())),
                          require_success=False):
                return None
            time.sleep(0.005)
        return f"no CONNACK within {timeout:g} s"

    def _log_tail(self, lines: int = 15) -> str:
        text = ""
        for path in (self._workdir / "mosquitto.out", self.log_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: clean exit, persistence DB saved
            try:
                proc.wait(_STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        """SIGTERM (saves persistence), SIGKILL after 5 s. Idempotent."""
        if self._proc is not None:
            self._terminate(self._proc)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL, for fault tests: nothing is saved, sessions since the last autosave are lost."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same port, so clients reconnect by themselves."""
        self.stop()
        if self._port is not None:
            self._requested_port = self._port
        self.start(timeout)

    def close(self) -> None:
        """Stop and remove the work dir if this object created it."""
        self.stop()
        if self._owned_tmp is not None:
            self._owned_tmp.cleanup()
            self._owned_tmp = None

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}" if self._port is not None else "not started"
        return f"MosquittoBroker({where}, pid={self.pid}, workdir={str(self._workdir)!r})"
