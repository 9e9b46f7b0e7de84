"""`coordinator provision`: a complete broker set-up that anyone on the network may reach but no one can abuse.

Writes, under one directory (created 0700):

- ``ca/``: the local CA. ``ca.key`` (0600) never goes to the broker or a device; keep it offline if you can.
- ``broker/``: everything mosquitto needs and nothing more: ``mosquitto.conf`` (complete, runs as is with
  ``mosquitto -c broker/mosquitto.conf``), ``ca.crt``, ``server.crt``, ``server.key`` (0600), ``passwd``
  (mosquitto's PBKDF2-SHA512 format, via ``mosquitto_passwd``), ``acl`` and a ``persistence/`` directory.
- ``coordinator/`` and ``agents/<id>/``: what to copy to each party: ``ca.crt``, a ``password`` file (0600)
  and, with client certificates, ``client.crt`` + ``client.key`` (CN = the party's MQTT username).

Why the config looks the way it does (each point was a bug, reproduced with a real mosquitto 2.0.11):
- Global options come before the first ``listener``. Listener options (``use_username_as_clientid``,
  ``cafile``, ``require_certificate`` ...) given before any ``listener`` line open mosquitto's *default*
  listener on port 1883 on every interface, in plaintext.
- ``use_username_as_clientid`` on every listener: without it a device can kick another off by connecting with
  its client id.
- ACL ``topic`` lines after a ``user`` line apply to that user only, so the reads every agent needs are
  ``pattern`` lines (patterns apply to all users), and only the coordinator may write coordinator topics.
- A plaintext listener only when asked for, and then on loopback only (local tools, never the network).
"""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from protocols.topics import PREFIX, validate_agent_id

COORDINATOR_USER = "coordinator"
LOOPBACK = "127.0.0.1"
CERT_DAYS = 730


@dataclass(frozen=True)
class Provisioned:
    directory: Path
    ca_cert: Path  # the copy the broker uses; every party has its own copy beside its password file
    passwords: dict[str, str]  # user -> password (also in each party's password file, mode 0600)
    config_lines: str  # the security lines, for appending to another mosquitto.conf (see config_path for the whole)
    tls_port: int
    config_path: Path  # complete mosquitto.conf: run it with `mosquitto -c config_path`
    plain_port: int | None = None  # loopback-only plaintext listener, when asked for
    client_certs: bool = False

    def party_dir(self, user: str) -> Path:
        """What to copy to this party: ca.crt, password (and client.crt/client.key)."""
        return self.directory / (COORDINATOR_USER if user == COORDINATOR_USER else f"agents/{user}")


def acl_text(prefix: str = PREFIX) -> str:
    """Coordinator: everything under the prefix. Every other user is an agent: reads the broadcast topics and its
    own inbox, writes only its own topics. ``pattern`` lines apply to every user wherever they stand in the file,
    ``topic`` lines only to the ``user`` above them."""
    return "\n".join([
        "# every user (patterns apply to all users; %u is the username = client id = certificate CN)",
        f"pattern read {prefix}/coord/status",
        f"pattern read {prefix}/blobs/#",
        f"pattern read {prefix}/agents/%u/inbox",
        *(f"pattern write {prefix}/agents/%u/{kind}" for kind in ("join", "status", "report", "request", "heartbeat")),
        f"pattern write {prefix}/agents/%u/update/#",
        "",
        "# the coordinator alone writes coordinator topics, blobs and inboxes, and reads what agents send",
        f"user {COORDINATOR_USER}",
        f"topic readwrite {prefix}/#",
        "",
    ])


def _write_private(path: Path, data: bytes) -> None:
    """Create with mode 0600 from the start (no window in which the file is world-readable)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


class _Pki:
    """An EC P-256 CA that signs a server certificate and client certificates."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._now = dt.datetime.now(dt.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "HeteroTune local CA")])
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(self._now).not_valid_after(self._now + dt.timedelta(days=CERT_DAYS))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))

    @staticmethod
    def key_pem(key: object) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                                 serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    @staticmethod
    def cert_pem(cert: object) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]

    def issue(self, common_name: str, *, server_names: list[str] | None = None) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a server (with subjectAltNames) or a client (CN = MQTT username)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(self._now)
                   .not_valid_after(self._now + dt.timedelta(days=CERT_DAYS))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server_names is not None:
            alt: list[x509.GeneralName] = []
            for name in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    alt.append(x509.DNSName(name))
            builder = (builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return self.cert_pem(builder.sign(self.key, hashes.SHA256())), self.key_pem(key)


def _password_file(path: Path, passwords: dict[str, str]) -> None:
    tool = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/bin:/usr/local/bin")
    if tool is None:
        raise FileNotFoundError("mosquitto_passwd not found; install the broker: apt-get install mosquitto")
    _write_private(path, b"")
    for user, password in passwords.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)


def config_text(broker_dir: Path, *, bind: str, tls_port: int, client_certs: bool,
                plain_port: int | None) -> tuple[str, str]:
    """(complete mosquitto.conf, the security part alone). Global options first, then one block per listener."""
    security_global = [
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {broker_dir / 'passwd'}",
        f"acl_file {broker_dir / 'acl'}",
    ]
    tls_listener = [
        f"listener {tls_port} {bind}",
        "protocol mqtt",
        f"cafile {broker_dir / 'ca.crt'}",
        f"certfile {broker_dir / 'server.crt'}",
        f"keyfile {broker_dir / 'server.key'}",
        "use_username_as_clientid true",
    ]
    if client_certs:
        tls_listener += ["require_certificate true", "use_identity_as_username true"]
    listeners = [*tls_listener, ""]
    if plain_port is not None:
        listeners += ["# plaintext, loopback only (local tools): passwords still required",
                      f"listener {plain_port} {LOOPBACK}", "protocol mqtt", "use_username_as_clientid true", ""]
    general = [
        "# written by `coordinator provision`: run with  mosquitto -c " + str(broker_dir / "mosquitto.conf"),
        "# global options (must come before the first listener)",
        f"user {getpass.getuser()}",  # as root, stay this user instead of dropping to 'mosquitto'
        *security_global,
        "set_tcp_nodelay true",
        "max_packet_size 2097152",
        "max_inflight_messages 4",
        "max_queued_messages 20000",
        "persistent_client_expiration 2d",
        "persistence true",
        f"persistence_location {broker_dir / 'persistence'}/",
        "autosave_interval 30",
        f"log_dest file {broker_dir / 'mosquitto.log'}",
        "",
        "# listeners",
    ]
    whole = "\n".join([*general, *listeners])
    security = "\n".join([*security_global, *tls_listener, ""])
    return whole, security


def provision(directory: Path, agent_ids: list[str], *, host: str = LOOPBACK, tls_port: int = 8883,
              bind: str | None = None, client_certs: bool = False, plain_port: int | None = None) -> Provisioned:
    """Write the CA, the broker's directory (complete mosquitto.conf) and each party's credentials.

    ``host`` is the address devices use (it goes into the server certificate); ``bind`` is the interface the
    TLS listener binds (default ``host``; ``0.0.0.0`` for every interface). ``plain_port`` adds a plaintext
    listener, always on loopback. With ``client_certs`` the TLS listener requires a certificate signed by the CA
    and takes the MQTT username from its CN (no password needed on that listener)."""
    for agent_id in agent_ids:
        validate_agent_id(agent_id)
        if agent_id == COORDINATOR_USER:
            raise ValueError(f"'{COORDINATOR_USER}' is reserved for the coordinator; rename that agent")
    if len(set(agent_ids)) != len(agent_ids):
        raise ValueError("an agent id is given twice; each device needs its own id")
    for port in (tls_port, plain_port):
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not in 1-65535")
    if plain_port is not None and plain_port == tls_port:
        raise ValueError("the plaintext and the TLS listener need different ports")
    directory = _private_dir(directory.resolve())
    ca_dir, broker_dir = _private_dir(directory / "ca"), _private_dir(directory / "broker")
    _private_dir(broker_dir / "persistence")

    pki = _Pki()
    ca_pem = pki.cert_pem(pki.cert)
    _write_private(ca_dir / "ca.key", pki.key_pem(pki.key))
    (ca_dir / "ca.crt").write_bytes(ca_pem)
    server_cert, server_key = pki.issue(host, server_names=list(dict.fromkeys([host, "localhost", LOOPBACK])))
    (broker_dir / "ca.crt").write_bytes(ca_pem)
    (broker_dir / "server.crt").write_bytes(server_cert)
    _write_private(broker_dir / "server.key", server_key)

    users = [COORDINATOR_USER, *agent_ids]
    passwords = {user: secrets.token_urlsafe(18) for user in users}
    _password_file(broker_dir / "passwd", passwords)
    (broker_dir / "acl").write_text(acl_text())
    for user in users:
        party = _private_dir(directory / (COORDINATOR_USER if user == COORDINATOR_USER else f"agents/{user}"))
        (party / "ca.crt").write_bytes(ca_pem)
        _write_private(party / "password", passwords[user].encode() + b"\n")
        if client_certs:
            cert, key = pki.issue(user)
            (party / "client.crt").write_bytes(cert)
            _write_private(party / "client.key", key)

    whole, security = config_text(broker_dir, bind=bind or host, tls_port=tls_port, client_certs=client_certs,
                                  plain_port=plain_port)
    _write_private(broker_dir / "mosquitto.conf", whole.encode())
    return Provisioned(directory, broker_dir / "ca.crt", passwords, security, tls_port, broker_dir / "mosquitto.conf",
                       plain_port, client_certs)

