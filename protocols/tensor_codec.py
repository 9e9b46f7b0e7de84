"""Wire encodings of tensor blobs: fp32 (as stored), fp16, or int8 with a symmetric per-row scale.

Why: the adapters a device exchanges each round are mostly the group tensors ``W_in`` / ``W_out``; sending them
as fp16 halves the bytes and int8 quarters them. Both sides compute in fp32: the sender quantises right before
the blob is cut into chunks, the receiver decodes right after the blob is assembled, before any validation or
aggregation sees it. The container stays safetensors (``protocols.tensors``), so nothing can execute on load,
and the blob's ``__metadata__`` repeats the encoding the message declared so a mismatch is caught.

int8 layout: tensor ``name`` holds int8 values in [-127, 127] with the original shape; tensor
``name + SCALE_SUFFIX`` holds one float32 scale per row (the leading axis of a tensor with 2 or more axes; one
scale for a 0-d or 1-d tensor). Value = q * scale, scale = max |row| / 127 (0 for an all-zero row).

Every decode failure (unknown encoding, a tensor of the wrong dtype, a scale of the wrong length, a non-finite
scale or decoded value) is a ``TensorDecodeError`` with the reason, which the coordinator turns into a rejected
update and the agent into a skipped round, never a crash.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import numpy as np

from protocols.errors import TensorDecodeError
from protocols.tensors import TensorDict, decode_tensors, encode_tensors, read_metadata

Encoding = Literal["fp32", "fp16", "int8"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)
SCALE_SUFFIX = "#scale"
INT8_MAX = 127


def rows_of(shape: tuple[int, ...]) -> int:
    """How many scales an int8 tensor of this shape carries: one per leading-axis row (one for 0-d/1-d)."""
    return int(shape[0]) if len(shape) >= 2 else 1


def quantise_int8(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: (values in [-127, 127] with ``array``'s shape, float32 scales of length rows)."""
    values = np.asarray(array, dtype=np.float32)
    rows = values.reshape(rows_of(values.shape), -1) if values.size else values.reshape(rows_of(values.shape), 0)
    peak = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(rows.shape[0], np.float32)
    scale = (peak / np.float32(INT8_MAX)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(rows / safe[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q.reshape(values.shape), scale


def dequantise_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of ``quantise_int8`` in float32 (no checks: ``decode_blob`` validates first)."""
    rows = q.reshape(rows_of(q.shape), -1).astype(np.float32) * scale.astype(np.float32)[:, None]
    return rows.reshape(q.shape)


def encode_blob(tensors: Mapping[str, np.ndarray], encoding: str) -> bytes:
    """The blob a sender publishes for ``tensors`` (float32) in ``encoding``.

    fp32 is byte-for-byte ``protocols.tensors.encode_tensors`` (no metadata), so runs that keep the default
    publish exactly the blobs (and sha256 addresses) they did before encodings existed.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown wire encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if encoding == "fp32":
        return encode_tensors(tensors)
    for name, value in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"tensor name {name!r} ends with {SCALE_SUFFIX!r}, reserved by the int8 encoding")
        if np.asarray(value).dtype != np.float32:
            raise ValueError(f"tensor {name!r} is {np.asarray(value).dtype}, not float32; {encoding} encodes "
                             "float32 tensors only")
    out: dict[str, np.ndarray] = {}
    if encoding == "fp16":
        out = {n: np.asarray(v).astype(np.float16) for n, v in tensors.items()}
    else:
        for name, value in tensors.items():
            out[name], out[name + SCALE_SUFFIX] = quantise_int8(value)
    return encode_tensors(out, metadata={"encoding": encoding})


def decode_blob(data: bytes, encoding: str) -> TensorDict:
    """float32 tensors of a received blob the message declared as ``encoding``; TensorDecodeError otherwise."""
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise TensorDecodeError(f"unknown wire encoding {str(encoding)[:32]!r}; this side understands "
                                f"{', '.join(ENCODINGS)}: the sender must use the run's [exchange] encoding")
    declared = read_metadata(data).get("encoding", "fp32")
    if declared != encoding:
        raise TensorDecodeError(f"blob is encoded as {declared[:32]!r} but the message declares {encoding!r}; "
                                "the update is rejected")
    raw = decode_tensors(data)
    if encoding == "fp32":
        return raw
    if encoding == "fp16":
        return {name: _finite(name, _of_dtype(name, a, np.float16).astype(np.float32)) for name, a in raw.items()}
    return _decode_int8(raw)


def _decode_int8(raw: TensorDict) -> TensorDict:
    names = [n for n in raw if not n.endswith(SCALE_SUFFIX)]
    orphans = sorted(n for n in raw if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] not in raw)
    if orphans:
        raise TensorDecodeError(f"int8 blob has scales without values: {orphans[:3]}; the update is rejected")
    out: TensorDict = {}
    for name in names:
        q = _of_dtype(name, raw[name], np.int8)
        scale_name = name + SCALE_SUFFIX
        if scale_name not in raw:
            raise TensorDecodeError(f"int8 tensor {name!r} has no scale {scale_name!r}; the update is rejected")
        scale = _of_dtype(scale_name, raw[scale_name], np.float32)
        if scale.shape != (rows_of(q.shape),):
            raise TensorDecodeError(f"scale of {name!r} has shape {scale.shape}, expected ({rows_of(q.shape)},) "
                                    "(one per row); the update is rejected")
        if not bool(np.all(np.isfinite(scale))) or bool(np.any(scale < 0)):
            raise TensorDecodeError(f"scale of {name!r} is not a finite non-negative number; the update is "
                                    "rejected")
        if q.size and int(np.min(q)) < -INT8_MAX:
            raise TensorDecodeError(f"int8 tensor {name!r} holds -128, outside the symmetric range "
                                    f"[-{INT8_MAX}, {INT8_MAX}]; the update is rejected")
        with np.errstate(over="ignore", invalid="ignore"):
            out[name] = _finite(name, dequantise_int8(q, scale))
    return out


def _of_dtype(name: str, array: np.ndarray, dtype: type[np.generic]) -> np.ndarray:
    if array.dtype != np.dtype(dtype):
        raise TensorDecodeError(f"tensor {name!r} is {array.dtype.name} in a blob whose encoding needs "
                                f"{np.dtype(dtype).name}; the update is rejected")
    return array


def _finite(name: str, array: np.ndarray) -> np.ndarray:
    if not bool(np.all(np.isfinite(array))):
        raise TensorDecodeError(f"tensor {name!r} decodes to non-finite values (overflow or a forged scale); "
                                "the update is rejected")
    return array


