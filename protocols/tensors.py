"""Adapter weights and updates on the wire: safetensors bytes <-> dict of numpy arrays.

safetensors is used because it cannot execute code on load (unlike pickle) and is readable from
both PyTorch (coordinator) and numpy/ONNX Runtime (agents). Encoding is byte-for-byte
deterministic so that equal tensors give equal sha256 blob addresses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
import safetensors.numpy

from protocols.errors import TensorDecodeError

TensorDict = dict[str, np.ndarray]

_HEADER_LEN_BYTES = 8


def encode_tensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise to safetensors with a canonical header.

    safetensors itself orders tensors deterministically but writes ``__metadata__`` from a Rust
    HashMap, whose order changes from process to process; the header is therefore rewritten with
    sorted metadata so the blob hash depends only on the content.
    """
    arrays: TensorDict = {}
    for name in sorted(tensors):
        value = tensors[name]
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name {name!r} is not a non-empty str; rename the tensor")
        if not isinstance(value, np.ndarray):
            raise ValueError(
                f"tensor {name!r} is a {type(value).__name__}, not a numpy.ndarray; convert it with "
                "numpy.asarray() (or .numpy() for torch tensors) first"
            )
        arrays[name] = np.asarray(value, order="C")  # ascontiguousarray would make 0-d arrays 1-d
    meta = {str(k): str(v) for k, v in sorted((metadata or {}).items())}
    try:
        raw = safetensors.numpy.save(arrays, metadata=meta or None)
    except Exception as exc:  # safetensors raises assorted types for unsupported dtypes
        raise ValueError(f"cannot encode tensors as safetensors: {exc}; use a numeric numpy dtype") from exc
    return _canonicalise_header(raw, meta)


def _canonicalise_header(raw: bytes, metadata: Mapping[str, str]) -> bytes:
    header_len = int.from_bytes(raw[:_HEADER_LEN_BYTES], "little")
    header = json.loads(raw[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len])
    ordered: dict[str, object] = {}
    if metadata:
        ordered["__metadata__"] = dict(metadata)
    ordered.update((k, v) for k, v in header.items() if k != "__metadata__")
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data section is 8-aligned
    return len(text).to_bytes(_HEADER_LEN_BYTES, "little") + text + raw[_HEADER_LEN_BYTES + header_len :]


def decode_tensors(data: bytes) -> TensorDict:
    """Parse a safetensors blob received from a peer.

    The arrays are read-only views over private buffers; copy before modifying in place.
    Any failure (including Rust panics inside safetensors on hostile input) becomes a
    ``TensorDecodeError`` so a receive loop only has to handle protocol errors.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TensorDecodeError(f"tensor payload is a {type(data).__name__}, not bytes; pass the raw blob")
    try:
        loaded = safetensors.numpy.load(bytes(data))
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # pyo3 PanicException derives from BaseException
        raise TensorDecodeError(
            f"payload of {len(data)} bytes is not a safetensors blob: {type(exc).__name__}: {exc}; "
            "the sender must re-encode it with protocols.tensors.encode_tensors"
        ) from exc
    return {name: loaded[name] for name in sorted(loaded)}


def read_metadata(data: bytes) -> dict[str, str]:
    """Return the ``__metadata__`` of a safetensors blob without decoding the tensors."""
    try:
        header_len = int.from_bytes(bytes(data[:_HEADER_LEN_BYTES]), "little")
        if len(data) < _HEADER_LEN_BYTES or header_len > len(data) - _HEADER_LEN_BYTES:
            raise ValueError("header length exceeds the payload")
        header = json.loads(bytes(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len]))
        meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ is not a str -> str mapping")
        return dict(meta)
    except (ValueError, RecursionError) as exc:
        raise TensorDecodeError(
            f"payload of {len(data)} bytes is not a safetensors blob: {exc}; the sender must re-encode it"
        ) from exc


def tensor_nbytes(tensors: Mapping[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in tensors.values())


def l2_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over all tensors (accumulated in float64 to avoid float16 overflow)."""
    total = 0.0
    for array in tensors.values():
        total += float(np.sum(np.square(np.asarray(array, dtype=np.float64))))
    return math.sqrt(total)


def check_tensors(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    max_norm: float | None = None,
) -> None:
    """Reject an update that could corrupt aggregation, naming the first problem found.

    ``expected`` maps name -> (shape, numpy dtype name). ``max_norm`` bounds the global L2 norm of
    all tensors together (the usual norm bound against poisoned or diverged updates).
    """
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise TensorDecodeError(
            f"update is missing tensors {missing}; the agent must upload every name in the assignment"
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise TensorDecodeError(
            f"update has unexpected tensors {unexpected}; upload only the names listed in the assignment"
        )
    for name in sorted(expected):
        shape, dtype_name = expected[name]
        array = tensors[name]
        if tuple(array.shape) != tuple(shape):
            raise TensorDecodeError(
                f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}; the agent is "
                "using a different backbone or bundle than assigned"
            )
        if array.dtype != np.dtype(dtype_name):
            raise TensorDecodeError(
                f"tensor {name!r} has dtype {array.dtype.name}, expected {np.dtype(dtype_name).name}; "
                "cast it before encoding"
            )
        if np.issubdtype(array.dtype, np.inexact) and not bool(np.all(np.isfinite(array))):
            kind = "NaN" if bool(np.any(np.isnan(array))) else "Inf"
            raise TensorDecodeError(
                f"tensor {name!r} contains {kind} values; local training diverged (lower the learning "
                "rate) and the update is rejected"
            )
    if max_norm is not None:
        norm = l2_norm(tensors)
        if not norm <= max_norm:
            raise TensorDecodeError(
                f"update L2 norm {norm:.6g} exceeds the bound {max_norm:.6g}; the update is rejected "
                "(diverged or malicious); lower the learning rate or raise the bound"
            )
