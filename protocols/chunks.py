"""Content-addressed blobs split into self-describing chunk frames.

Why chunks at all: a single multi-MB MQTT message restarts from zero after every keepalive timeout on
a slow link and balloons broker/client memory (reference/mqtt.md §5, §9.6); 256 KiB frames fit every
broker's default packet limit. Why self-describing frames: QoS 1 duplicates, overlapping
subscriptions and retained redelivery mean frames arrive repeated and in any order, so each one
carries its blob address, index and its own sha256, letting the receiver dedupe and ask for exactly
the chunk that was damaged.

Frame layout: ``b"HTC1"`` | 4-byte big-endian header length | UTF-8 JSON header | data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from protocols.errors import BlobIntegrityError, ChunkError, TopicError
from protocols.topics import validate_sha256

CHUNK_SIZE = 256 * 1024
MAGIC = b"HTC1"
MAX_HEADER_BYTES = 1024  # a real header is ~220 bytes; the cap bounds work done on garbage input
_PREFIX_LEN = len(MAGIC) + 4
_HEADER_KEYS = frozenset({"blob", "i", "n", "size", "sha", "len"})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))


def _is_sha(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        validate_sha256(value)
    except TopicError:
        return False
    return True


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class BlobRef:
    """Address of a blob: what a manifest must carry so a receiver can fetch and verify it."""

    sha256: str
    size: int
    chunks: int

    def __post_init__(self) -> None:
        if not _is_sha(self.sha256):
            raise ChunkError(f"BlobRef sha256 {self.sha256!r} is not 64 lowercase hex digits")
        if not _is_count(self.size):
            raise ChunkError(f"BlobRef size {self.size!r} must be an int >= 0")
        if not _is_count(self.chunks) or not 1 <= self.chunks <= max(1, self.size):
            raise ChunkError(
                f"BlobRef chunks {self.chunks!r} must be between 1 and max(1, size={self.size}); "
                "build refs with BlobRef.from_blob()"
            )

    @classmethod
    def from_blob(cls, data: bytes, chunk_size: int = CHUNK_SIZE) -> BlobRef:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return cls(sha256=sha256_hex(data), size=len(data), chunks=_chunk_count(len(data), chunk_size))


@dataclass(frozen=True)
class Chunk:
    blob_sha: str
    index: int
    count: int
    blob_size: int
    data: bytes


def split_blob(blob: bytes, chunk_size: int = CHUNK_SIZE) -> list[Chunk]:
    """Cut ``blob`` into chunks of at most ``chunk_size`` bytes (an empty blob is one empty chunk)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    blob = bytes(blob)
    sha = sha256_hex(blob)
    count = _chunk_count(len(blob), chunk_size)
    return [
        Chunk(sha, i, count, len(blob), blob[i * chunk_size : (i + 1) * chunk_size]) for i in range(count)
    ]


def encode_chunk(chunk: Chunk) -> bytes:
    if not _is_sha(chunk.blob_sha) or not _is_count(chunk.index) or not _is_count(chunk.count):
        raise ChunkError(f"cannot encode chunk with invalid address {chunk.blob_sha!r}[{chunk.index!r}]")
    if not chunk.index < chunk.count or not _is_count(chunk.blob_size) or len(chunk.data) > chunk.blob_size:
        raise ChunkError(
            f"cannot encode chunk {chunk.index}/{chunk.count} of {len(chunk.data)} bytes for a blob of "
            f"{chunk.blob_size} bytes; build chunks with split_blob()",
            index=chunk.index,
            blob_sha=chunk.blob_sha,
        )
    header = json.dumps(
        {
            "blob": chunk.blob_sha,
            "i": chunk.index,
            "n": chunk.count,
            "size": chunk.blob_size,
            "sha": sha256_hex(chunk.data),
            "len": len(chunk.data),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode("utf-8")
    return b"".join((MAGIC, len(header).to_bytes(4, "big"), header, chunk.data))


def decode_chunk(payload: bytes) -> Chunk:
    """Parse and verify one frame; raise ``ChunkError`` (with index/blob when known) on any defect."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ChunkError(f"chunk payload is a {type(payload).__name__}, not bytes")
    payload = bytes(payload)
    hint = "; the sender must frame chunks with protocols.chunks.encode_chunk"
    if len(payload) < _PREFIX_LEN:
        raise ChunkError(f"chunk frame truncated: {len(payload)} bytes, shorter than the 8-byte prefix{hint}")
    if payload[: len(MAGIC)] != MAGIC:
        raise ChunkError(f"not a chunk frame: magic {payload[:4]!r} != {MAGIC!r}{hint}")
    header_len = int.from_bytes(payload[len(MAGIC) : _PREFIX_LEN], "big")
    if header_len > MAX_HEADER_BYTES:
        raise ChunkError(f"chunk header length {header_len} exceeds {MAX_HEADER_BYTES} bytes{hint}")
    if len(payload) < _PREFIX_LEN + header_len:
        raise ChunkError(f"chunk frame truncated inside the header ({len(payload)} bytes){hint}")
    try:
        header = json.loads(payload[_PREFIX_LEN : _PREFIX_LEN + header_len].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ChunkError(f"chunk header is not valid UTF-8 JSON: {exc}{hint}") from exc
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        keys = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise ChunkError(f"chunk header has keys {keys}, expected {sorted(_HEADER_KEYS)}{hint}")

    blob_sha = header["blob"] if _is_sha(header["blob"]) else None
    index = header["i"] if _is_count(header["i"]) else None
    count, size, length = header["n"], header["size"], header["len"]

    def fail(reason: str) -> ChunkError:
        where = f"chunk {index!r} of blob {str(blob_sha)[:12]}"
        return ChunkError(f"{where}: {reason}", index=index, blob_sha=blob_sha)

    if blob_sha is None or not _is_sha(header["sha"]):
        raise fail(f"header 'blob'/'sha' must be 64 lowercase hex digits{hint}")
    if index is None or not _is_count(count) or not _is_count(size) or not _is_count(length):
        raise fail(f"header 'i', 'n', 'size' and 'len' must be ints >= 0{hint}")
    if not 1 <= count <= max(1, size):
        raise fail(f"chunk count {count} is impossible for a blob of {size} bytes{hint}")
    if index >= count:
        raise fail(f"index out of range for {count} chunks{hint}")
    data = payload[_PREFIX_LEN + header_len :]
    if len(data) != length:
        raise fail(f"frame has {len(data)} data bytes, header says {length} (truncated?); request it again")
    if length > size:
        raise fail(f"chunk of {length} bytes is larger than its blob ({size} bytes){hint}")
    if sha256_hex(data) != header["sha"]:
        raise fail("data does not match its sha256 (corrupted in transit or at rest); request it again")
    return Chunk(blob_sha=blob_sha, index=index, count=count, blob_size=size, data=data)


class BlobAssembler:
    """Collects the chunks of one blob in any order, ignoring duplicates, then verifies the whole.

    Chunk bytes are kept as separate ``bytes`` objects and joined once in ``assemble`` so memory
    stays at about twice the blob size at the peak, never quadratic.
    """

    def __init__(self, ref: BlobRef) -> None:
        self._ref = ref
        self._parts: dict[int, bytes] = {}
        self._received = 0

    @property
    def ref(self) -> BlobRef:
        return self._ref

    def add(self, chunk: Chunk) -> bool:
        """Store ``chunk``; return False for a duplicate (which is ignored)."""
        ref = self._ref
        if chunk.blob_sha != ref.sha256:
            raise ChunkError(
                f"chunk {chunk.index} belongs to blob {chunk.blob_sha[:12]}, not {ref.sha256[:12]}; "
                "it was delivered on the wrong topic",
                index=chunk.index,
                blob_sha=chunk.blob_sha,
            )
        if chunk.count != ref.chunks or chunk.blob_size != ref.size:
            raise ChunkError(
                f"chunk {chunk.index} of blob {ref.sha256[:12]} claims {chunk.count} chunks / "
                f"{chunk.blob_size} bytes but the manifest says {ref.chunks} / {ref.size}; "
                "the sender used a different chunk size or a stale manifest",
                index=chunk.index,
                blob_sha=chunk.blob_sha,
            )
        if not 0 <= chunk.index < ref.chunks or len(chunk.data) > ref.size:
            raise ChunkError(
                f"chunk {chunk.index} ({len(chunk.data)} bytes) does not fit blob {ref.sha256[:12]} "
                f"of {ref.chunks} chunks / {ref.size} bytes",
                index=chunk.index,
                blob_sha=chunk.blob_sha,
            )
        if chunk.index in self._parts:
            return False
        self._parts[chunk.index] = chunk.data
        self._received += len(chunk.data)
        return True

    def has(self, index: int) -> bool:
        return index in self._parts

    def missing(self) -> list[int]:
        return [i for i in range(self._ref.chunks) if i not in self._parts]

    @property
    def complete(self) -> bool:
        return len(self._parts) == self._ref.chunks

    @property
    def received_bytes(self) -> int:
        return self._received

    def reset(self) -> None:
        self._parts.clear()
        self._received = 0

    def assemble(self) -> bytes:
        """Join and verify; on a size/sha mismatch reset so every chunk is fetched again."""
        ref = self._ref
        if not self.complete:
            missing = self.missing()
            raise ChunkError(
                f"blob {ref.sha256[:12]} is incomplete: {len(missing)} of {ref.chunks} chunks missing "
                f"(first: {missing[:10]}); add them before calling assemble()",
                index=missing[0],
                blob_sha=ref.sha256,
            )
        data = b"".join(self._parts[i] for i in range(ref.chunks))
        if len(data) != ref.size or sha256_hex(data) != ref.sha256:
            got = sha256_hex(data)
            self.reset()
            raise BlobIntegrityError(
                f"reassembled blob has {len(data)} bytes / sha256 {got[:12]} but the manifest says "
                f"{ref.size} bytes / {ref.sha256[:12]}; all chunks were discarded, fetch them again"
            )
        return data
