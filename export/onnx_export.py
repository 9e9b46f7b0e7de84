"""PyTorch -> ONNX -> ONNX Runtime Training artifacts, with the recipe measured in reference/ort-training.md.

Legacy TorchScript exporter (dynamo=False), opset 17, no constant folding (so every parameter name survives
as an initializer), LayerNormalization nodes given their two statistics outputs (ORT 1.19's gradient
builder needs them), and IR version <= 10 on every graph (the newest ORT 1.19 loads).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from export.dema.model import AdapterClassifier, TrainingObjective

OPSET = 17
MAX_IR_VERSION = 10
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


class ExportError(RuntimeError):
    """The exported graph broke an invariant the ORT training path relies on."""


# The training and eval graphs' inputs after the model's own, and their outputs (training_loss in dema/model.py).
OBJECTIVE_INPUTS = ("labels", "prototypes", "prototype_weights", "anchors", "anchor_weights")
GRAPH_OUTPUTS = ("loss", "logits", "representation")


def graph_inputs(model: AdapterClassifier, *, batch_size: int, seq_len: int
                 ) -> tuple[tuple[torch.Tensor, ...], dict[str, dict[int, str]]]:
    """Example inputs to trace with, and their dynamic axes, in the graph's input order: the model's inputs,
    then labels [B], prototypes [classes, r], prototype weights [classes], anchors [B, r] and anchor weights
    [B]."""
    classes, rank = model.head.out_features, model.config.rank
    objective = (torch.arange(batch_size, dtype=torch.long) % classes, torch.zeros(classes, rank),
                 torch.zeros(classes), torch.zeros(batch_size, rank), torch.zeros(batch_size))
    batch_axis = {0: "batch"}
    objective_axes: dict[str, dict[int, str]] = dict(zip(OBJECTIVE_INPUTS, (batch_axis, {}, {}, batch_axis,
                                                                             batch_axis), strict=True))
    model_inputs, model_axes = _model_inputs(model, batch_size=batch_size, seq_len=seq_len)
    return (*model_inputs, *objective), {**model_axes, **objective_axes}


def _model_inputs(model: AdapterClassifier, *, batch_size: int, seq_len: int
                  ) -> tuple[tuple[torch.Tensor, ...], dict[str, dict[int, str]]]:
    if model.spec.modality == "image":
        size = model.spec.image_size
        pixels = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
        return (pixels,), {"pixel_values": {0: "batch"}}
    ids = torch.ones(batch_size, seq_len, dtype=torch.long)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    # A padded example is essential: with an all-ones mask transformers skips masking altogether, and the
    # trace would bake that shortcut in (padded tokens would then be attended to on the device).
    mask[-1, seq_len // 2 :] = 0
    return (ids, mask), {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def export_onnx(model: AdapterClassifier, path: Path, *, batch_size: int, seq_len: int) -> onnx.ModelProto:
    """Trace the classifier's training objective to an ONNX graph whose trainable names equal PyTorch's
    parameter names. The loss is part of the graph (not an ORT loss block) because FedProto's prototype term
    needs the representation and the global prototypes; see `training_loss`."""
    model.eval()
    inputs, dynamic_axes = graph_inputs(model, batch_size=batch_size, seq_len=seq_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from transformers' mask utils are harmless here
        torch.onnx.export(
            TrainingObjective(model), inputs, str(path),
            input_names=list(dynamic_axes), output_names=list(GRAPH_OUTPUTS),
            dynamic_axes={**dynamic_axes, "logits": {0: "batch"}, "representation": {0: "batch"}},
            opset_version=OPSET, do_constant_folding=False,
            training=torch.onnx.TrainingMode.TRAINING, dynamo=False,
        )
    proto = onnx.load(str(path))
    initializers = {i.name for i in proto.graph.initializer}
    lost = [n for n in model.trainable_names() + model.frozen_names() if n not in initializers]
    if lost:
        raise ExportError(f"export renamed or folded {len(lost)} parameters (e.g. {lost[:3]}); "
                          "keep do_constant_folding=False and the legacy exporter")
    return proto


def add_layernorm_stat_outputs(proto: onnx.ModelProto) -> int:
    """Give each one-output LayerNormalization its Mean and InvStdDev outputs; returns how many were fixed."""
    fixed = 0
    for node in proto.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([node.output[0] + "_mean", node.output[0] + "_invstd"])
            fixed += 1
    return fixed


def cap_ir_version(directory: Path) -> None:
    """ORT 1.19 refuses IR > 10; the optimizer graph is stamped with the installed onnx's IR."""
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        path = directory / name
        proto = onnx.load(str(path))
        if proto.ir_version > MAX_IR_VERSION:
            proto.ir_version = MAX_IR_VERSION
            onnx.save(proto, str(path))


def generate_training_artifacts(model: AdapterClassifier, proto: onnx.ModelProto, out_dir: Path,
                                *, weight_decay: float = 0.0) -> None:
    """Training, eval and optimizer graphs plus a checkpoint holding the frozen and trainable weights.

    Both graphs return (loss, logits, representation): the device computes accuracy and FedProto's class
    prototypes without a separate inference model. The loss is the exported graph's own first output (no ORT
    loss block). Frozen weights go in the checkpoint ("ckpt mode"): stored once, loaded once.
    """
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)
    add_layernorm_stat_outputs(proto)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _native_stderr_to(out_dir / "artifacts.log"):
        artifacts.generate_artifacts(
            proto,
            requires_grad=model.trainable_names(),
            frozen_params=model.frozen_names(),
            loss=None, loss_input_names=["loss"],
            optimizer=artifacts.OptimType.AdamW if weight_decay == 0.0 else _adamw(weight_decay),
            artifact_directory=str(out_dir),
            additional_output_names=list(GRAPH_OUTPUTS[1:]),
        )
    cap_ir_version(out_dir)
    for name in ARTIFACT_FILES:
        if not (out_dir / name).exists():
            raise ExportError(f"generate_artifacts did not write {name} in {out_dir}")


@contextlib.contextmanager
def _native_stderr_to(path: Path) -> Iterator[None]:
    """Send C++-level stderr to a file: the gradient builder logs every graph pass at INFO level and
    ignores the Python-side logger severity. The log is kept beside the artifacts for debugging."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _adamw(weight_decay: float) -> object:
    from onnxruntime.training import onnxblock

    return onnxblock.optim.AdamW(weight_decay=weight_decay)
