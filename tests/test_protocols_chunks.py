from __future__ import annotations

import json
import os
import random

import pytest

from protocols.chunks import (
    CHUNK_SIZE,
    MAGIC,
    BlobAssembler,
    BlobRef,
    Chunk,
    decode_chunk,
    encode_chunk,
    sha256_hex,
    split_blob,
)
from protocols.errors import BlobIntegrityError, ChunkError


def _frame_parts(frame: bytes) -> tuple[dict[str, object], bytes]:
    n = int.from_bytes(frame[4:8], "big")
    return json.loads(frame[8 : 8 + n]), frame[8 + n :]


def _reframe(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return MAGIC + len(raw).to_bytes(4, "big") + raw + data


@pytest.mark.parametrize(
    ("size", "expected_chunks"),
    [
        (0, 1),
        (1, 1),
        (CHUNK_SIZE - 1, 1),
        (CHUNK_SIZE, 1),
        (CHUNK_SIZE + 1, 2),
        (3_500_000, 14),
    ],
)
def test_split_and_assemble_round_trip(size: int, expected_chunks: int) -> None:
    blob = os.urandom(size)
    ref = BlobRef.from_blob(blob)
    assert ref == BlobRef(sha256=sha256_hex(blob), size=size, chunks=expected_chunks)
    chunks = split_blob(blob)
    assert len(chunks) == expected_chunks
    assert all(len(c.data) <= CHUNK_SIZE for c in chunks)
    assert b"".join(c.data for c in chunks) == blob

    frames = [encode_chunk(c) for c in chunks]
    random.Random(size).shuffle(frames)
    assembler = BlobAssembler(ref)
    for frame in frames:
        assert not assembler.complete
        assert assembler.add(decode_chunk(frame)) is True
    assert assembler.complete and assembler.missing() == []
    assert assembler.received_bytes == size
    assert assembler.assemble() == blob


def test_decoded_chunk_equals_original() -> None:
    chunk = split_blob(b"hello world", chunk_size=4)[1]
    assert decode_chunk(encode_chunk(chunk)) == chunk
    header, data = _frame_parts(encode_chunk(chunk))
    assert header == {
        "blob": chunk.blob_sha,
        "i": 1,
        "n": 3,
        "size": 11,
        "sha": sha256_hex(b"o wo"),
        "len": 4,
    }
    assert data == b"o wo"


def test_duplicates_are_ignored_and_harmless() -> None:
    blob = os.urandom(3 * 1000 + 5)
    chunks = split_blob(blob, chunk_size=1000)
    assembler = BlobAssembler(BlobRef.from_blob(blob, chunk_size=1000))
    assert assembler.add(chunks[1]) is True
    assert assembler.add(chunks[1]) is False
    assert assembler.add(decode_chunk(encode_chunk(chunks[1]))) is False
    assert assembler.received_bytes == 1000
    assert assembler.missing() == [0, 2, 3]
    for c in chunks + chunks:
        assembler.add(c)
    assert assembler.received_bytes == len(blob)
    assert assembler.assemble() == blob


def test_missing_lists_exactly_the_absent_indices() -> None:
    blob = os.urandom(10 * 100)
    chunks = split_blob(blob, chunk_size=100)
    assembler = BlobAssembler(BlobRef.from_blob(blob, chunk_size=100))
    assert assembler.missing() == list(range(10))
    for i in (0, 3, 4, 9):
        assembler.add(chunks[i])
    assert assembler.missing() == [1, 2, 5, 6, 7, 8]
    assert assembler.has(3) and not assembler.has(5)
    with pytest.raises(ChunkError, match="incomplete: 6 of 10 chunks missing") as info:
        assembler.assemble()
    assert info.value.index == 1


def test_corrupted_data_byte_names_the_chunk() -> None:
    blob = os.urandom(5 * 1000)
    frame = bytearray(encode_chunk(split_blob(blob, chunk_size=1000)[3]))
    frame[-10] ^= 0x01
    with pytest.raises(ChunkError, match="does not match its sha256") as info:
        decode_chunk(bytes(frame))
    assert info.value.index == 3
    assert info.value.blob_sha == sha256_hex(blob)


def test_truncated_data_names_the_chunk() -> None:
    frame = encode_chunk(split_blob(os.urandom(3000), chunk_size=1000)[2])
    with pytest.raises(ChunkError, match="truncated") as info:
        decode_chunk(frame[:-1])
    assert info.value.index == 2


def _valid_header() -> tuple[dict[str, object], bytes]:
    return _frame_parts(encode_chunk(split_blob(os.urandom(3000), chunk_size=1000)[1]))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda h: h.update(i=3), "index out of range"),
        (lambda h: h.update(i=-1), "must be ints"),
        (lambda h: h.update(i=True), "must be ints"),
        (lambda h: h.update(n=0), "impossible"),
        (lambda h: h.update(n=5000), "impossible"),
        (lambda h: h.update(len=999), "header says 999"),
        (lambda h: h.update(size=500), "larger than its blob"),
        (lambda h: h.update(blob="XYZ"), "64 lowercase hex"),
        (lambda h: h.update(sha="0" * 64), "does not match its sha256"),
        (lambda h: h.pop("sha"), "expected"),
        (lambda h: h.update(extra=1), "expected"),
    ],
)
def test_inconsistent_headers_are_rejected(mutate: object, needle: str) -> None:
    header, data = _valid_header()
    mutate(header)  # type: ignore[operator]
    with pytest.raises(ChunkError, match=needle):
        decode_chunk(_reframe(header, data))


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"", "truncated"),
        (b"HTC1\x00\x00", "truncated"),
        (b"HTC2\x00\x00\x00\x02{}", "magic"),
        (b"HTC1\x00\x00\x10\x00" + b"x" * 5000, "exceeds 1024"),
        (b"HTC1\x00\x00\x00\x40{}", "truncated inside the header"),
        (b"HTC1\x00\x00\x00\x03{x}", "not valid UTF-8 JSON"),
        (b"HTC1\x00\x00\x00\x02\xff\xfe", "not valid UTF-8 JSON"),
        (b"HTC1\x00\x00\x00\x02[]", "expected"),
        (b"HTC1\x00\x00\x03\xe8" + b"[" * 1000, "not valid UTF-8 JSON"),
    ],
)
def test_malformed_frames_are_rejected(payload: bytes, needle: str) -> None:
    with pytest.raises(ChunkError, match=needle) as info:
        decode_chunk(payload)
    assert info.value.index is None


def test_whole_blob_corruption_is_caught_and_resets() -> None:
    blob = os.urandom(4000)
    ref = BlobRef.from_blob(blob, chunk_size=1000)
    chunks = split_blob(blob, chunk_size=1000)
    forged = Chunk(ref.sha256, 2, 4, 4000, bytes(1000))  # self-consistent frame, wrong content
    assert decode_chunk(encode_chunk(forged)) == forged
    assembler = BlobAssembler(ref)
    for c in (chunks[0], chunks[1], forged, chunks[3]):
        assembler.add(c)
    assert assembler.complete
    with pytest.raises(BlobIntegrityError, match="fetch them again"):
        assembler.assemble()
    assert assembler.missing() == [0, 1, 2, 3] and assembler.received_bytes == 0
    for c in chunks:
        assembler.add(c)
    assert assembler.assemble() == blob


def test_short_blob_with_matching_chunk_count_fails_integrity() -> None:
    blob = os.urandom(2500)
    ref = BlobRef.from_blob(blob, chunk_size=1000)
    assembler = BlobAssembler(ref)
    for c in split_blob(blob, chunk_size=1000)[:2]:
        assembler.add(c)
    assembler.add(Chunk(ref.sha256, 2, 3, 2500, b""))
    with pytest.raises(BlobIntegrityError, match=r"(0|2000) bytes"):
        assembler.assemble()


def test_assembler_rejects_chunks_of_another_blob_or_chunking() -> None:
    blob = os.urandom(3000)
    ref = BlobRef.from_blob(blob, chunk_size=1000)
    assembler = BlobAssembler(ref)
    other = split_blob(os.urandom(3000), chunk_size=1000)[0]
    with pytest.raises(ChunkError, match="belongs to blob") as info:
        assembler.add(other)
    assert info.value.index == 0
    with pytest.raises(ChunkError, match="manifest says 3 / 3000"):
        assembler.add(split_blob(blob, chunk_size=500)[0])
    with pytest.raises(ChunkError, match="does not fit"):
        assembler.add(Chunk(ref.sha256, 7, 3, 3000, b"x"))
    assert assembler.missing() == [0, 1, 2]


def test_blobref_and_encode_validate_inputs() -> None:
    with pytest.raises(ChunkError, match="64 lowercase hex"):
        BlobRef(sha256="abc", size=1, chunks=1)
    with pytest.raises(ChunkError, match="chunks"):
        BlobRef(sha256="a" * 64, size=10, chunks=11)
    with pytest.raises(ChunkError, match="size"):
        BlobRef(sha256="a" * 64, size=-1, chunks=1)
    with pytest.raises(ChunkError, match="split_blob"):
        encode_chunk(Chunk("a" * 64, 0, 1, 2, b"abc"))
    with pytest.raises(ValueError, match="chunk_size"):
        split_blob(b"x", chunk_size=0)
    assert BlobRef.from_blob(b"") == BlobRef(sha256=sha256_hex(b""), size=0, chunks=1)
