"""Hostile input: decoders may only ever raise their protocol error type, and must return promptly."""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.chunks import decode_chunk, encode_chunk, split_blob
from protocols.errors import ChunkError, MessageError, TensorDecodeError
from protocols.messages import Assignment, BlobRefModel, decode_message, encode_message
from protocols.tensors import decode_tensors, encode_tensors

FUZZ = settings(max_examples=300, deadline=2000, database=None, suppress_health_check=[HealthCheck.too_slow])

_FRAME = encode_chunk(split_blob(os.urandom(3000), chunk_size=1000)[1])
_MESSAGE = encode_message(
    Assignment(
        run_id="run-1",
        round=2,
        nonce="n",
        backbone="tiny",
        bundle=BlobRefModel(sha256="a" * 64, size=10, chunks=1),
        weights=BlobRefModel(sha256="b" * 64, size=10, chunks=2),
        upload_names=["x"],
        local_steps=1,
        batch_size=1,
        learning_rate=0.1,
        deadline_unix=0.0,
        seed=1,
    )
)
_TENSORS = encode_tensors({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)}, {"k": "v"})


def _mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """Valid payloads with bytes overwritten, inserted or cut: reaches deeper than random bytes."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["set", "insert", "cut"]))
            pos = draw(st.integers(0, len(data)))
            if op == "set" and pos < len(data):
                data[pos] = draw(st.integers(0, 255))
            elif op == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            else:
                del data[pos : pos + draw(st.integers(1, 64))]
        return bytes(data)

    return build()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=2048) | _mutated(_FRAME) | st.binary(max_size=64).map(lambda b: b"HTC1" + b))
def test_decode_chunk_only_raises_chunk_error(payload: bytes) -> None:
    try:
        chunk = decode_chunk(payload)
    except ChunkError:
        return
    assert encode_chunk(chunk) == payload  # anything accepted must be a canonical, verified frame


@FUZZ
@given(st.binary(max_size=2048) | _mutated(_MESSAGE))
def test_decode_message_only_raises_message_error(payload: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode_message(payload)


@FUZZ
@given(_json, st.sampled_from(["join", "assignment", "update", "resend", "coord_status", "agent_status"]))
def test_decode_message_with_structured_json(body: object, kind: str) -> None:
    obj = {"v": 1, "type": kind, **body} if isinstance(body, dict) else body
    with contextlib.suppress(MessageError):
        decode_message(json.dumps(obj).encode())


@FUZZ
@given(st.binary(max_size=2048) | _mutated(_TENSORS))
def test_decode_tensors_only_raises_tensor_decode_error(payload: bytes) -> None:
    try:
        decoded = decode_tensors(payload)
    except TensorDecodeError:
        return
    assert all(isinstance(v, np.ndarray) for v in decoded.values())
