from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from protocols.errors import TensorDecodeError
from protocols.tensors import (
    check_tensors,
    decode_tensors,
    encode_tensors,
    l2_norm,
    read_metadata,
    tensor_nbytes,
)


def _update() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer.1.lora_B": rng.standard_normal((8, 4)).astype(np.float32),
        "layer.0.lora_A": rng.standard_normal((4, 16)).astype(np.float32),
        "head.bias": np.zeros(3, dtype=np.float16),
    }


EXPECTED = {
    "layer.0.lora_A": ((4, 16), "float32"),
    "layer.1.lora_B": ((8, 4), "float32"),
    "head.bias": ((3,), "float16"),
}


def test_round_trip_preserves_names_shapes_dtypes_values() -> None:
    tensors = {
        **_update(),
        "steps": np.array([1, 2, 3], dtype=np.int64),
        "scalar": np.array(2.5, dtype=np.float64),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "mask": np.array([True, False]),
        "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],  # non-contiguous view
    }
    back = decode_tensors(encode_tensors(tensors, metadata={"round": "3"}))
    assert list(back) == sorted(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype, name
        assert back[name].shape == array.shape, name
        np.testing.assert_array_equal(back[name], array)


def test_metadata_round_trip() -> None:
    blob = encode_tensors(_update(), metadata={"round": "3", "run_id": "r1", "agent": "ä"})
    assert read_metadata(blob) == {"agent": "ä", "round": "3", "run_id": "r1"}
    assert read_metadata(encode_tensors(_update())) == {}


_DETERMINISM_SNIPPET = """
import hashlib, numpy as np
from protocols.tensors import encode_tensors
t = {"b": np.arange(6, dtype=np.float32), "a": np.ones((2, 2), dtype=np.float16), "c": np.zeros(1)}
meta = {k: str(i) for i, k in enumerate("qwertyuiop")}
print(hashlib.sha256(encode_tensors(t, metadata=meta)).hexdigest())
"""


def test_encoding_is_deterministic_across_processes_and_insertion_order() -> None:
    # safetensors writes metadata in Rust HashMap order, which is seeded per process.
    digests = {
        subprocess.run(
            [sys.executable, "-c", _DETERMINISM_SNIPPET], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(3)
    }
    assert len(digests) == 1
    forward = _update()
    backward = dict(reversed(list(forward.items())))
    assert encode_tensors(forward, {"x": "1", "y": "2"}) == encode_tensors(backward, {"y": "2", "x": "1"})


def test_check_accepts_a_valid_update() -> None:
    update = _update()
    check_tensors(update, EXPECTED)
    check_tensors(update, EXPECTED, max_norm=l2_norm(update) + 1e-6)
    check_tensors({"n": np.array([1, 2], dtype=np.int32)}, {"n": ((2,), "int32")})


def _with(name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    update = _update()
    update[name] = value
    return update


@pytest.mark.parametrize(
    ("tensors", "needle"),
    [
        ({k: v for k, v in _update().items() if k != "head.bias"}, r"missing tensors \['head.bias'\]"),
        (_with("extra", np.zeros(1, np.float32)), r"unexpected tensors \['extra'\]"),
        (_with("layer.0.lora_A", np.zeros((16, 4), np.float32)), r"shape \(16, 4\), expected \(4, 16\)"),
        (_with("layer.0.lora_A", np.zeros((4, 16), np.float64)), "dtype float64, expected float32"),
        (_with("head.bias", np.array([0, np.nan, 0], np.float16)), "'head.bias' contains NaN"),
        (_with("layer.1.lora_B", np.full((8, 4), np.inf, np.float32)), "'layer.1.lora_B' contains Inf"),
        (_with("layer.1.lora_B", np.full((8, 4), -np.inf, np.float32)), "contains Inf"),
    ],
)
def test_check_names_the_first_problem(tensors: dict[str, np.ndarray], needle: str) -> None:
    with pytest.raises(TensorDecodeError, match=needle):
        check_tensors(tensors, EXPECTED)


def test_check_enforces_the_global_norm_bound() -> None:
    update = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([4.0], np.float32)}
    expected = {"a": ((2,), "float32"), "b": ((1,), "float32")}
    assert l2_norm(update) == pytest.approx(5.0)
    check_tensors(update, expected, max_norm=5.0)
    with pytest.raises(TensorDecodeError, match=r"L2 norm 5 exceeds the bound 4\.9"):
        check_tensors(update, expected, max_norm=4.9)
    # squares of 60000 overflow float16: the norm must be accumulated in float64
    big: dict[str, np.ndarray] = {"a": np.full((2,), 60000, np.float16), "b": np.zeros(1, np.float32)}
    with pytest.raises(TensorDecodeError, match="L2 norm 84852"):
        check_tensors(big, {"a": ((2,), "float16"), "b": ((1,), "float32")}, max_norm=1e4)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00" * 7,
        b"not a safetensors blob at all",
        (2**63).to_bytes(8, "little") + b"{}",
        b"\x40" + b"\0" * 7 + b'{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}' + b" " * 8,
        b"\x38" + b"\0" * 7 + b'{"t":{"dtype":"XX","shape":[1],"data_offsets":[0,4]}}' + b" " * 3 + b"abcd",
    ],
)
def test_decode_rejects_garbage(payload: bytes) -> None:
    with pytest.raises(TensorDecodeError, match=r"not a safetensors blob.*re-encode"):
        decode_tensors(payload)


def test_decode_rejects_truncated_blob() -> None:
    blob = encode_tensors(_update())
    with pytest.raises(TensorDecodeError, match="not a safetensors blob"):
        decode_tensors(blob[:-1])


def test_encode_rejects_non_arrays_with_a_hint() -> None:
    with pytest.raises(ValueError, match=r"numpy\.asarray"):
        encode_tensors({"a": [1, 2, 3]})  # type: ignore[dict-item]


def test_tensor_nbytes() -> None:
    assert tensor_nbytes(_update()) == 4 * 16 * 4 + 8 * 4 * 4 + 3 * 2
    assert tensor_nbytes({}) == 0
