"""Wire encodings (protocols/tensor_codec.py): exact int8 values and scales on hand-computed tensors, round-trip
error bounds, and every forged blob rejected with a reason instead of a crash."""

from __future__ import annotations

import numpy as np
import pytest

from bench.methods_federation import encode_with_feedback
from coordinator.config import ConfigError, parse_config
from protocols.errors import TensorDecodeError
from protocols.tensor_codec import SCALE_SUFFIX, decode_blob, encode_blob, quantise_int8
from protocols.tensors import decode_tensors, encode_tensors, read_metadata


def test_int8_values_and_scales_by_hand() -> None:
    """Row 0: max |x| = 1.27 -> scale 0.01, q = (50, -127, 0); row 1: max 2.54 -> scale 0.02, q = (127, 50, -15)."""
    x = np.array([[0.5, -1.27, 0.0], [2.54, 1.0, -0.3]], np.float32)
    q, scale = quantise_int8(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    np.testing.assert_array_equal(q, [[50, -127, 0], [127, 50, -15]])
    np.testing.assert_allclose(scale, [0.01, 0.02], rtol=1e-6)
    decoded = decode_blob(encode_blob({"w": x}, "int8"), "int8")["w"]
    np.testing.assert_allclose(decoded, [[0.5, -1.27, 0.0], [2.54, 1.0, -0.3]], atol=1e-6)
    assert decoded.dtype == np.float32


def test_int8_one_scale_for_vectors_and_zero_rows() -> None:
    """A 1-d tensor has one scale (3/127: -1.2 -> -50.8 -> -51); an all-zero row gets scale 0 and decodes to 0."""
    q, scale = quantise_int8(np.array([3.0, -1.2], np.float32))
    np.testing.assert_array_equal(q, [127, -51])
    np.testing.assert_allclose(scale, [3.0 / 127], rtol=1e-6)
    q, scale = quantise_int8(np.zeros((2, 4), np.float32))
    np.testing.assert_array_equal(scale, [0.0, 0.0])
    out = decode_blob(encode_blob({"z": np.zeros((2, 4), np.float32)}, "int8"), "int8")["z"]
    np.testing.assert_array_equal(out, np.zeros((2, 4), np.float32))


def test_round_trip_error_bounds() -> None:
    """int8: every element within half a step (scale / 2) of its row; fp16: within 2^-11 relative."""
    rng = np.random.default_rng(3)
    tensors = {"a": rng.normal(0, 0.05, (64, 384)).astype(np.float32),
               "b": rng.normal(0, 1.0, (384, 64)).astype(np.float32), "c": rng.normal(0, 1, 7).astype(np.float32)}
    decoded = decode_blob(encode_blob(tensors, "int8"), "int8")
    for name, x in tensors.items():
        _, scale = quantise_int8(x)
        rows = x.reshape(scale.shape[0], -1)
        error = np.abs(decoded[name].reshape(rows.shape) - rows)
        assert np.all(error <= scale[:, None] / 2 + 1e-7), name
        assert np.max(error) > 0  # it really is quantised
    half = decode_blob(encode_blob(tensors, "fp16"), "fp16")
    for name, x in tensors.items():
        np.testing.assert_allclose(half[name], x, rtol=2.0**-11, atol=6e-8)
        assert half[name].dtype == np.float32


def test_sizes_and_fp32_is_the_plain_blob() -> None:
    """fp32 is byte-identical to protocols.tensors (same sha256 addresses as before); int8 is ~1/4 of it."""
    x = {"w": np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)}
    assert encode_blob(x, "fp32") == encode_tensors(x)
    fp32, fp16, int8 = (len(encode_blob(x, e)) for e in ("fp32", "fp16", "int8"))
    assert fp16 < 0.51 * fp32 and int8 < 0.27 * fp32
    assert read_metadata(encode_blob(x, "int8")) == {"encoding": "int8"}


def _forged(tensors: dict[str, np.ndarray], encoding: str) -> bytes:
    return encode_tensors(tensors, metadata={"encoding": encoding})


def _int8_blob(**changes: np.ndarray) -> bytes:
    raw = dict(decode_tensors(encode_blob({"w": np.ones((2, 3), np.float32)}, "int8")))
    raw.update(changes)
    return _forged(raw, "int8")


@pytest.mark.parametrize("blob, encoding, reason", [
    (_int8_blob(**{"w#scale": np.array([np.inf, 1], np.float32)}), "int8", "not a finite non-negative"),
    (_int8_blob(**{"w#scale": np.array([np.nan, 1], np.float32)}), "int8", "not a finite non-negative"),
    (_int8_blob(**{"w#scale": np.array([-1, 1], np.float32)}), "int8", "not a finite non-negative"),
    (_int8_blob(**{"w#scale": np.array([1, 1, 1], np.float32)}), "int8", "expected (2,)"),
    (_int8_blob(**{"w#scale": np.array([1, 1], np.float64)}), "int8", "needs float32"),
    (_int8_blob(**{"w#scale": np.array([3e38, 1], np.float32)}), "int8", "non-finite"),  # 127 * 3e38 = inf
    (_int8_blob(w=np.full((2, 3), -128, np.int8)), "int8", "-128"),
    (_int8_blob(w=np.ones((2, 3), np.float32)), "int8", "needs int8"),
    (_int8_blob(**{"v#scale": np.ones(1, np.float32)}), "int8", "scales without values"),
    (_forged({"w": np.ones((2, 3), np.int8)}, "int8"), "int8", "has no scale"),
    (_forged({"w": np.array([1.0, np.inf], np.float16)}, "fp16"), "fp16", "non-finite"),
    (_forged({"w": np.ones(2, np.float32)}, "fp16"), "fp16", "needs float16"),
    (encode_blob({"w": np.ones(2, np.float32)}, "int8"), "fp16", "message declares 'fp16'"),
    (encode_blob({"w": np.ones(2, np.float32)}, "fp32"), "int8", "message declares 'int8'"),
    (encode_blob({"w": np.ones(2, np.float32)}, "int8"), "int4", "unknown wire encoding"),
    (encode_blob({"w": np.ones(2, np.float32)}, "int8")[:-3], "int8", "not a safetensors blob"),
])
def test_forged_blobs_are_rejected_with_a_reason(blob: bytes, encoding: str, reason: str) -> None:
    with pytest.raises(TensorDecodeError, match=None) as raised:
        decode_blob(blob, encoding)
    assert reason in str(raised.value), str(raised.value)


def test_encoder_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(ValueError, match="unknown wire encoding"):
        encode_blob({"w": np.ones(2, np.float32)}, "int4")
    with pytest.raises(ValueError, match="not float32"):
        encode_blob({"w": np.ones(2, np.float64)}, "int8")
    with pytest.raises(ValueError, match="reserved"):
        encode_blob({"w" + SCALE_SUFFIX: np.ones(2, np.float32)}, "int8")


def test_plan_setting_is_validated_once() -> None:
    assert parse_config({}).exchange.encoding == "fp32"
    assert parse_config({"exchange": {"encoding": "int8"}}).exchange.encoding == "int8"
    with pytest.raises(ConfigError, match=r"exchange\.encoding"):
        parse_config({"exchange": {"encoding": "int4"}})


def test_error_feedback_keeps_the_running_sum_within_half_a_step() -> None:
    """Sending x = (1.0, 0.3) five times as int8 (scale 1/127): plain rounding sends 38/127 = 0.29921 each time,
    so the sum drifts by 5 x 0.00079; with error feedback the sum of what was decoded stays within half a step
    (1/254) of 5 x 0.3, and the residual is exactly what the last encoding lost."""
    x = {"v": np.array([1.0, 0.3], np.float32)}
    residual: dict[str, np.ndarray] = {}
    sent = np.zeros(2, np.float64)
    for _ in range(5):
        blob, residual = encode_with_feedback(x, "int8", residual)
        sent += decode_blob(blob, "int8")["v"]
    plain = 5 * decode_blob(encode_blob(x, "int8"), "int8")["v"].astype(np.float64)
    assert abs(plain[1] - 1.5) > 0.0035  # without feedback the error piles up
    assert abs(sent[1] - 1.5) <= 0.5 / 127 + 1e-6
    np.testing.assert_allclose(sent + residual["v"], 5 * x["v"].astype(np.float64), atol=1e-5)
