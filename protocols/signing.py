"""Signed envelopes for fl/v1 control messages (Ed25519, from the ``cryptography`` package).

Why: on a broker without a per-agent ACL anyone who can connect can publish to an agent's inbox, and even with
one a retained message may outlive the run that left it. So every message the coordinator sends to agents is
wrapped in an envelope signed with the run key, and agents act only on envelopes that verify against the public
key they were given. The signature covers the topic the message was published to, the run id and a sequence
number, so a captured envelope cannot be replayed to another agent (other topic), into another run (other run
id) or again later (the receiver keeps the highest sequence it accepted per topic). Agents sign their reports
the same way with a per-process key they announce when joining.

The envelope is JSON: ``{"v":1,"type":"sealed","run":..,"topic":..,"seq":..,"body":"<inner message JSON>",
"sig":"<hex>"}``. The inner message is an ordinary fl/v1 message (protocols/messages.py), kept as a string so
the signed bytes are exactly the bytes that are later decoded. Blobs are not signed: a signed message names
each blob by its sha256 and the receiver checks the reassembled bytes against it (protocols/chunks.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.credentials import read_private_file
from protocols.durable import write_atomic
from protocols.errors import MessageError
from protocols.messages import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, SEALED_TYPE, JoinRequest, encode_message

DOMAIN = b"heterotune fl/v1 sealed\n"  # so a signature over anything else can never pass as an envelope
MAX_SEQ = 2**63 - 1
_HEX_SIG = re.compile(r"^[0-9a-f]{128}$")
_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = {"v", "type", "run", "topic", "seq", "body", "sig"}


class SealError(MessageError):
    """An envelope is malformed or does not verify; the message is one line saying which."""


@dataclass(frozen=True)
class Sealed:
    run: str
    topic: str
    seq: int
    body: bytes
    sig: bytes


def signed_bytes(run: str, topic: str, seq: int, body: str) -> bytes:
    """What the signature covers: a fixed domain tag and the canonical JSON of (run, topic, seq, body)."""
    return DOMAIN + json.dumps([run, topic, seq, body], separators=(",", ":"), ensure_ascii=True).encode("ascii")


def seal(key: Ed25519PrivateKey, *, run: str, topic: str, seq: int, body: bytes) -> bytes:
    """Wrap an encoded fl/v1 message in an envelope signed for ``topic`` in ``run``."""
    text = body.decode("utf-8")
    sig = key.sign(signed_bytes(run, topic, seq, text))
    envelope = {"v": PROTOCOL_VERSION, "type": SEALED_TYPE, "run": run, "topic": topic, "seq": seq, "body": text,
                "sig": sig.hex()}
    data = json.dumps(envelope, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"sealed message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    return data


def parse_sealed(payload: bytes) -> Sealed | None:
    """The envelope in ``payload``, or None if the payload is not an envelope at all (a plain message).

    Raises SealError for an envelope with missing, extra or ill-typed fields.
    """
    if len(payload) > MAX_MESSAGE_BYTES:
        raise SealError(f"message too large: {len(payload)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("type") != SEALED_TYPE:
        return None
    if set(obj) != _FIELDS:
        raise SealError(f"sealed envelope has fields {sorted(obj)}, expected {sorted(_FIELDS)}")
    run, topic, seq, body, sig = obj["run"], obj["topic"], obj["seq"], obj["body"], obj["sig"]
    if not (isinstance(run, str) and 0 < len(run) <= 128 and isinstance(topic, str) and 0 < len(topic) <= 512):
        raise SealError("sealed envelope: run must be 1-128 and topic 1-512 characters")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise SealError(f"sealed envelope: seq {seq!r} is not an integer in [0, 2^63)")
    if not isinstance(body, str) or not isinstance(sig, str) or _HEX_SIG.fullmatch(sig) is None:
        raise SealError("sealed envelope: body must be a string and sig 128 lowercase hex digits")
    try:
        body_bytes = body.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SealError(f"sealed envelope: body is not valid text ({exc})") from None
    return Sealed(run, topic, seq, body_bytes, bytes.fromhex(sig))


def verify(sealed: Sealed, key: Ed25519PublicKey) -> None:
    """Raise SealError unless ``sealed`` was signed by the private half of ``key``."""
    try:
        key.verify(sealed.sig, signed_bytes(sealed.run, sealed.topic, sealed.seq, sealed.body.decode("utf-8")))
    except InvalidSignature:
        raise SealError("signature does not verify against the configured key (forged, or signed by another "
                        "coordinator/run key)") from None


class SeqCounter:
    """Strictly increasing sequence numbers that also increase across restarts: microseconds since the epoch,
    bumped by one whenever two messages fall in the same microsecond. A resumed coordinator therefore continues
    above every sequence its agents have seen (as long as its clock does not step back)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return self._last


class Signer:
    """A private key plus its sequence counter: seals messages for one sender."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self._seq = SeqCounter()

    def seal(self, run: str, topic: str, body: bytes) -> bytes:
        return seal(self.key, run=run, topic=topic, seq=self._seq.next(), body=body)

    @property
    def public_hex(self) -> str:
        return public_key_hex(self.key.public_key())


def join_proof(token: bytes, run_id: str, request: JoinRequest) -> str:
    """HMAC-SHA256 of the run's join token over the run id and the whole join request (its proof field left
    out): proves the sender holds the token without sending it, and binds the proof to this run, this agent id,
    nonce, declared sample counts and agent key, so it cannot be reused for anything else."""
    body = encode_message(request.model_copy(update={"proof": None}))
    return hmac.new(token, b"heterotune join\n" + run_id.encode("utf-8") + b"\n" + body, hashlib.sha256).hexdigest()


# --- keys -----------------------------------------------------------------------------------------------------


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    if not isinstance(text, str) or _HEX_KEY.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not an Ed25519 public key (64 lowercase hex digits)")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))


def public_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def write_key_pair(private_path: Path) -> Ed25519PrivateKey:
    """Generate a key pair: the private key (PEM, 0600) at ``private_path`` in a 0700 directory, the public key
    (PEM) beside it as ``<name>.pub``, which is what agents get (``edge-agent join --coordinator-key``)."""
    private_path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(private_path.parent, 0o700)
    key = generate_key()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_atomic(private_path, pem, mode=0o600)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_atomic(public_path(private_path), pub, mode=0o644)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The coordinator's signing key; refused when other users may read it (see credentials.read_private_file)."""
    pem = read_private_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot read the signing key {path}: {exc}; create one with `coordinator provision` or "
                         "let `coordinator run` generate it into the run directory") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def ensure_key_pair(private_path: Path) -> Ed25519PrivateKey:
    """The key pair at ``private_path``, generated on first use (a run directory keeps its key across resumes)."""
    return load_private_key(private_path) if private_path.exists() else write_key_pair(private_path)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key file: PEM (as written by write_key_pair) or one line of 64 hex digits."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the coordinator key {path}: {exc}") from None
    text = data.decode("ascii", errors="replace").strip()
    if _HEX_KEY.fullmatch(text):
        return public_key_from_hex(text)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM public key ({exc}); give the run key's .pub file") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key
