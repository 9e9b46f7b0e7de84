"""One merged inference graph from a bundle and a device's trained tensors: what `edge-agent export` ships.

Why the bundle's eval graph and not a fresh PyTorch export: the device has no torch and no exporter, but it has
``eval_model.onnx`` (every device downloads the bundle tar), whose trainable and frozen weights are graph *inputs*
(ONNX Runtime Training's "checkpoint mode": the values live in the checkpoint). Turning exactly those inputs into
initializers, keeping only the ``logits`` output and dropping what only training reads (labels, FedProto's
prototypes, the public-set anchors, the loss and the representation) gives the very graph the agent evaluated
with, so its logits equal the agent's own. Both trainer backends end up here with the same tensor names, hence
the same graph bytes for the same values.

The frozen backbone comes from the torch part (``backbone.safetensors``) where the device has it (PyTorch backend,
builder), else from the ORT checkpoint through the training API (ORT backend). Both hold the same float32 values
(tests/test_inference_export.py checks the graphs are byte-identical).

``onnx`` is reached through `load_onnx()` at run time only (the agent's import guard keeps it out of module-level
imports): exporting needs it, training and `edge-agent predict` do not.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from protocols.bundle_manifest import TORCH_PART, BundleManifest

EVAL_GRAPH = "eval_model.onnx"
OUTPUT = "logits"
# What only the training objective reads (export/onnx_export.py OBJECTIVE_INPUTS): never in an inference graph.
TRAINING_ONLY_INPUTS = ("labels", "prototypes", "prototype_weights", "anchors", "anchor_weights")
BACKBONE_PREFIX = "backbone."  # the frozen weights' names in the graphs (AdapterClassifier.backbone)
OPSET = 17
MAX_IR_VERSION = 10
PRODUCER = "heterotune-edge"
# Weights at least this large go to the external data file; smaller ones (scalars, shapes) stay in the graph.
EXTERNAL_MIN_BYTES = 1024
# Offsets in the data file are multiples of the page size, so every weight starts on its own page of the mapping
# (onnxruntime maps the file on Linux; 64 KiB, Windows' mapping granularity, would add ~7 MB of padding per graph).
EXTERNAL_ALIGN = 4096


class InferenceExportError(ValueError):
    """The tensors or the bundle cannot make an inference graph; the message says what and what to do."""


def load_onnx() -> Any:
    """The onnx module, or ImportError with the install command."""
    try:
        return importlib.import_module("onnx")
    except ImportError as exc:
        raise ImportError("exporting a model needs the 'onnx' package: pip install onnx (wheels exist for Linux "
                          "x86_64 and aarch64); predicting with an exported model does not") from exc


def model_inputs(manifest: BundleManifest) -> tuple[str, ...]:
    """The inference graph's inputs, in order, for the bundle's modality."""
    return ("pixel_values",) if manifest.modality == "image" else ("input_ids", "attention_mask")


def checked_tensors(manifest: BundleManifest, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every trainable tensor of the bundle as contiguous float32, or an error naming what is missing, foreign,
    misshapen or not finite (a state from another bundle must never become a model)."""
    expected = {t.name: tuple(t.shape) for t in manifest.tensors}
    missing = sorted(set(expected) - set(tensors))
    foreign = sorted(set(tensors) - set(expected))
    if missing or foreign:
        raise InferenceExportError(
            f"the tensors do not fit the {manifest.backbone} bundle: missing {missing[:3]} ({len(missing)}), "
            f"foreign {foreign[:3]} ({len(foreign)}); export the state that was trained with this bundle")
    out = {}
    for name, shape in expected.items():
        value = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if value.shape != shape:
            raise InferenceExportError(f"tensor '{name}' has shape {value.shape}, the {manifest.backbone} bundle "
                                       f"expects {shape}; export the state that was trained with this bundle")
        if not np.isfinite(value).all():
            raise InferenceExportError(f"tensor '{name}' holds NaN or infinite values; this state cannot make a "
                                       "model (export an earlier round's state)")
        out[name] = value
    return out


def frozen_weights(bundle_dir: Path, manifest: BundleManifest) -> dict[str, np.ndarray]:
    """The frozen backbone as the graphs name it ("backbone.*"): from the torch part if present, else from the ORT
    checkpoint (training API). Either holds the values the bundle was built with."""
    part = manifest.parts.get(TORCH_PART)
    if part is not None and (bundle_dir / part.file).is_file():
        from safetensors.numpy import load_file

        return {BACKBONE_PREFIX + name: value for name, value in load_file(str(bundle_dir / part.file)).items()}
    checkpoint = bundle_dir / "checkpoint"
    if not checkpoint.is_file():
        raise InferenceExportError(f"{bundle_dir} has neither the torch part nor the ORT checkpoint: the bundle is "
                                   "incomplete; let the agent fetch it again (edge-agent join) and re-export")
    from edge_agent.ort_api import load_training_api

    try:
        api = load_training_api()
    except ImportError as exc:
        raise InferenceExportError(f"{bundle_dir} has no torch part, and reading the ORT checkpoint needs "
                                   f"onnxruntime-training ({exc})") from exc
    state = api.CheckpointState.load_checkpoint(str(checkpoint))
    trainable = {t.name for t in manifest.tensors}
    return {name: np.array(param.data, dtype=np.float32, copy=True) for name, param in state.parameters
            if name not in trainable and not param.requires_grad}


def build_inference_model(bundle_dir: Path, manifest: BundleManifest, tensors: Mapping[str, np.ndarray]) -> bytes:
    """The serialized merged graph for ``tensors`` (every trainable tensor of the bundle)."""
    trained = checked_tensors(manifest, tensors)
    eval_graph = bundle_dir / EVAL_GRAPH
    if not eval_graph.is_file():
        raise InferenceExportError(f"{eval_graph} is missing: the bundle is incomplete; let the agent fetch it again")
    return merge_graph(eval_graph.read_bytes(), {**frozen_weights(bundle_dir, manifest), **trained},
                       model_inputs(manifest), doc=f"{manifest.backbone} + DeMA adapters + head ({manifest.task.name})")


def merge_graph(eval_model: bytes, parameters: Mapping[str, np.ndarray], inputs: tuple[str, ...], *,
                doc: str = "") -> bytes:
    """Pure graph surgery on the bundle's eval graph: parameter inputs -> initializers, only ``logits`` out,
    inference Dropouts and unused LayerNorm statistics removed, dead nodes pruned. Deterministic."""
    onnx = load_onnx()
    numpy_helper = onnx.numpy_helper
    model = onnx.load_from_string(eval_model)
    graph = model.graph
    graph_inputs = [i.name for i in graph.input]
    missing = [name for name in inputs if name not in graph_inputs]
    if missing:
        raise InferenceExportError(f"the bundle's eval graph has no input {missing}; it was built by an "
                                   "incompatible exporter")
    unknown = [name for name in graph_inputs if name not in parameters and name not in inputs
               and name not in TRAINING_ONLY_INPUTS]
    if unknown:
        raise InferenceExportError(f"no value for the graph's weights {unknown[:3]} ({len(unknown)}): the bundle "
                                   "is incomplete or from another exporter")
    if OUTPUT not in {o.name for o in graph.output}:
        raise InferenceExportError(f"the bundle's eval graph has no '{OUTPUT}' output")

    _drop_inference_dropouts(graph)
    folded = _fold_weight_transposes(graph, parameters, inputs)
    parameters = {**parameters, **folded}
    kept = _live_nodes(graph, {OUTPUT})
    used = {name for node in kept for name in node.input if name}
    leaking = [name for name in TRAINING_ONLY_INPUTS if name in used]
    if leaking:
        raise InferenceExportError(f"the logits depend on training-only inputs {leaking}; cannot make an inference "
                                   "graph from this bundle")
    del graph.node[:]
    graph.node.extend(kept)
    for node in graph.node:  # LayerNormalization's Mean/InvStdDev: only ORT's gradient builder wanted them
        if node.op_type == "LayerNormalization":
            while len(node.output) > 1 and node.output[-1] not in used:
                node.output.pop()
    outputs = [o for o in graph.output if o.name == OUTPUT]
    del graph.output[:]
    graph.output.extend(outputs)
    user_inputs = [i for i in graph.input if i.name in inputs]
    weights = [numpy_helper.from_array(np.ascontiguousarray(parameters[name], dtype=np.float32), name)
               for name in [*graph_inputs, *sorted(folded)] if name in used and name not in inputs]
    del graph.input[:]
    graph.input.extend(sorted(user_inputs, key=lambda i: inputs.index(i.name)))
    del graph.initializer[:]
    graph.initializer.extend(weights)
    produced = {name for node in graph.node for name in node.output}
    live_info = [v for v in graph.value_info if v.name in produced and v.name in used]
    del graph.value_info[:]
    graph.value_info.extend(live_info)

    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", OPSET) > OPSET:
        raise InferenceExportError(f"the eval graph uses opset {opsets['']}, above {OPSET}")
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    model.producer_name, model.producer_version = PRODUCER, "1"
    model.doc_string = doc
    graph.name = "heterotune_inference"
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString(deterministic=True)
    return data


def externalize_weights(graph: bytes, location: str) -> tuple[bytes, bytes]:
    """Split a self-contained graph into (graph without its large weights, the weights' data file ``location``).

    Why: onnxruntime copies every weight embedded in the graph at least once while loading (the parsed protobuf and
    the tensors made from it), so an embedded 91 MB graph peaked near 195 MB of RSS; weights in an external data
    file at aligned offsets are memory-mapped instead (measured in docs/inference-benchmark.md). The values are
    the same bytes, so the logits are identical. Pure and deterministic: tensors in graph order, each at the next
    multiple of EXTERNAL_ALIGN; ``location`` is relative to the graph file, so both files must sit side by side.
    """
    onnx = load_onnx()
    model = onnx.load_from_string(graph)
    data = bytearray()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise InferenceExportError(f"weight '{tensor.name}' already lives in an external file; externalize a "
                                       "self-contained graph")
        raw = tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
        if len(raw) < EXTERNAL_MIN_BYTES:
            continue
        data.extend(bytes(-len(data) % EXTERNAL_ALIGN))
        offset = len(data)
        data.extend(raw)
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                      "string_data"):
            tensor.ClearField(field)
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
    structure: bytes = model.SerializeToString(deterministic=True)
    return structure, bytes(data)


def _drop_inference_dropouts(graph: Any) -> None:
    """A Dropout without a training_mode input is the identity at inference: wire its readers to its input."""
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        if node.op_type == "Dropout" and (len(node.input) < 3 or not node.input[2]):
            renamed[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    for output in graph.output:
        if output.name in renamed:
            raise InferenceExportError(f"graph output {output.name} is a Dropout's output; cannot rewire it")
    del graph.node[:]
    graph.node.extend(kept)


def _fold_weight_transposes(graph: Any, parameters: Mapping[str, np.ndarray], inputs: tuple[str, ...]
                            ) -> dict[str, np.ndarray]:
    """``MatMul(x, Transpose(W))`` -> ``MatMul(x, W_transposed)`` with the transpose done once, here.

    The training export keeps every Linear as a runtime Transpose of its weight (no constant folding, so parameter
    names survive). ONNX Runtime folds those at session load anyway, but the int8 quantiser looks at the graph as
    written and quantises only MatMuls whose weight is an initializer: without this the encoder stayed float.
    Exact (a transpose moves values, it does not change them). Returns the new initializers by name.
    """
    folded: dict[str, np.ndarray] = {}
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        source = node.input[0] if node.op_type == "Transpose" and len(node.input) == 1 else ""
        if source in parameters and source not in inputs:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            name = f"{source}.transposed" if perm in (None, [1, 0]) else f"{source}.perm{''.join(map(str, perm))}"
            folded[name] = np.ascontiguousarray(np.transpose(np.asarray(parameters[source]), perm))
            renamed[node.output[0]] = name
            continue
        kept.append(node)
    if any(output.name in renamed for output in graph.output):
        raise InferenceExportError("a graph output is a transposed weight; cannot fold it")
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def _live_nodes(graph: Any, wanted: set[str]) -> list[Any]:
    """The nodes the wanted outputs depend on, in their original (topological) order."""
    needed = set(wanted)
    live = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(name for name in node.input if name)
    return list(reversed(live))
