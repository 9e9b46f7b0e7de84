"""The package's graphs keep their weights in an external data file that onnxruntime memory-maps (issue 17's RSS
goal): the split moves every large weight out at aligned offsets, leaves small tensors in the graph, changes no
value (the logits are bit-identical to the self-contained graph's), and onnxruntime really maps the file instead
of copying it (it shows in /proc/self/maps while the session lives)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.inference_graph import (
    EXTERNAL_ALIGN,
    EXTERNAL_MIN_BYTES,
    InferenceExportError,
    externalize_weights,
    load_onnx,
)
from edge_agent.ort_api import load_inference_runtime

HIDDEN = EXTERNAL_MIN_BYTES // 4  # so the bias is exactly EXTERNAL_MIN_BYTES


def tiny_graph() -> tuple[bytes, dict[str, np.ndarray]]:
    """y = relu(x @ W1 + b) * s @ W2: two 256 KiB weights, a bias of exactly EXTERNAL_MIN_BYTES (moves out) and a
    scalar (stays in the graph)."""
    onnx = load_onnx()
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32),
               "w2": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32),
               "b": rng.standard_normal((EXTERNAL_MIN_BYTES // 4,)).astype(np.float32),
               "s": np.array([0.5], np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("Mul", ["r", "s"], ["rs"]),
             helper.make_node("MatMul", ["rs", "w2"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", HIDDEN])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", HIDDEN])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString(), weights


def session(path: Path | bytes) -> object:
    ort = load_inference_runtime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                providers=["CPUExecutionProvider"])


def test_large_weights_move_out_at_aligned_offsets_and_small_ones_stay(tmp_path: Path) -> None:
    onnx = load_onnx()
    graph, weights = tiny_graph()
    structure, data = externalize_weights(graph, "model.onnx.data")
    model = onnx.load_from_string(structure)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL}
    assert sorted(where) == ["b", "w1", "w2"]  # the scalar is below EXTERNAL_MIN_BYTES
    assert len(structure) < 2000 < len(data)
    for name, entry in where.items():
        offset, length = int(entry["offset"]), int(entry["length"])
        assert entry["location"] == "model.onnx.data" and offset % EXTERNAL_ALIGN == 0
        assert np.array_equal(np.frombuffer(data[offset : offset + length], np.float32),
                              weights[name].reshape(-1))
    assert externalize_weights(graph, "model.onnx.data") == (structure, data)  # deterministic
    with pytest.raises(InferenceExportError, match="already lives in an external file"):
        externalize_weights(structure, "again.data")


def test_the_split_graph_computes_the_same_logits_from_a_memory_mapped_file(tmp_path: Path) -> None:
    graph, _ = tiny_graph()
    structure, data = externalize_weights(graph, "model.onnx.data")
    (tmp_path / "model.onnx").write_bytes(structure)
    (tmp_path / "model.onnx.data").write_bytes(data)
    x = np.random.default_rng(1).standard_normal((3, HIDDEN)).astype(np.float32)
    inline = session(graph).run(["logits"], {"x": x})[0]  # type: ignore[attr-defined]
    split = session(tmp_path / "model.onnx")
    assert np.array_equal(split.run(["logits"], {"x": x})[0], inline)  # type: ignore[attr-defined]
    # Mapped, not copied: the data file is in this process's address space while the session holds it.
    maps = Path("/proc/self/maps").read_text()
    assert str((tmp_path / "model.onnx.data").resolve()) in maps
    (tmp_path / "model.onnx.data").unlink()  # and the graph alone is not a model: the file is really used
    with pytest.raises(Exception, match=r"(?i)model\.onnx\.data|external|no such file"):
        session(tmp_path / "model.onnx")
