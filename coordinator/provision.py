"""`coordinator provision`: a broker configuration that anyone on the network may reach but no one can abuse.

Writes a local CA, a server certificate for the broker's address, one password per agent (mosquitto's own
PBKDF2-SHA512 format, via `mosquitto_passwd`), an ACL under which an agent reads only the broadcast topics
and its own inbox and writes only its own topics, and the mosquitto.conf lines that tie them together with
`use_username_as_clientid` (without it any valid user can take over another agent's session; mqtt.md §7).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from protocols.topics import PREFIX, validate_agent_id

COORDINATOR_USER = "coordinator"


@dataclass(frozen=True)
class Provisioned:
    directory: Path
    ca_cert: Path
    passwords: dict[str, str]  # user -> password (also in credentials.json, mode 0600)
    config_lines: str  # to append to a mosquitto.conf (or pass as MosquittoBroker(extra=...))
    tls_port: int


def acl_text(prefix: str = PREFIX) -> str:
    """Coordinator: everything under the prefix. Agents: their own topics, plus the broadcast ones."""
    return "\n".join([
        f"user {COORDINATOR_USER}",
        f"topic readwrite {prefix}/#",
        "",
        "# every other user is an agent; %u is its username (= its client id)",
        f"pattern read {prefix}/agents/%u/inbox",
        *(f"pattern write {prefix}/agents/%u/{kind}" for kind in ("join", "status", "report", "request")),
        f"pattern write {prefix}/agents/%u/update/#",
        f"topic read {prefix}/coord/status",
        f"topic read {prefix}/blobs/#",
        "",
    ])


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _tls_material(directory: Path, host: str) -> tuple[Path, Path, Path]:
    """An EC P-256 CA and a server certificate for `host` (IP or DNS name) plus localhost, valid 2 years."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "HeteroTune local CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + dt.timedelta(days=730))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    try:
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        names = [x509.DNSName(host)]
    names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + dt.timedelta(days=730))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(directory / "ca.key", key_pem(ca_key))
    cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key_pem(server_key))
    return ca_path, cert_path, key_path


def _password_file(path: Path, passwords: dict[str, str]) -> None:
    tool = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/bin:/usr/local/bin")
    if tool is None:
        raise FileNotFoundError("mosquitto_passwd not found; install the broker: apt-get install mosquitto")
    path.write_text("")
    path.chmod(0o600)
    for user, password in passwords.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)


def provision(directory: Path, agent_ids: list[str], *, host: str = "127.0.0.1", tls_port: int = 8883) -> Provisioned:
    """Write CA, server certificate, passwords, ACL and config lines into `directory` (created 0700)."""
    for agent_id in agent_ids:
        validate_agent_id(agent_id)
        if agent_id == COORDINATOR_USER:
            raise ValueError(f"'{COORDINATOR_USER}' is reserved for the coordinator; rename that agent")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca, cert, key = _tls_material(directory, host)
    passwords = {user: secrets.token_urlsafe(18) for user in [COORDINATOR_USER, *agent_ids]}
    _password_file(directory / "passwd", passwords)
    (directory / "acl").write_text(acl_text())
    _write_private(directory / "credentials.json", json.dumps(passwords, indent=2).encode())
    lines = "\n".join([
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {directory / 'passwd'}",
        f"acl_file {directory / 'acl'}",
        "use_username_as_clientid true",
        f"listener {tls_port} {host}",
        f"cafile {ca}",
        f"certfile {cert}",
        f"keyfile {key}",
        "",
    ])
    (directory / "mosquitto-security.conf").write_text(lines)
    os.chmod(directory / "mosquitto-security.conf", 0o600)
    return Provisioned(directory, ca, passwords, lines, tls_port)
