"""PyTorch trainer backend: the same bundle, loss and optimizer as the ORT graphs, for devices without ORT.

No onnxruntime-training wheel exists for Linux aarch64 (Raspberry Pi, Jetson), so there the agent trains with
torch. The coordinator must not be able to tell the backends apart, so this backend reproduces ORT's training
graph exactly: the bundle's frozen weights (its torch part), the manifest's DeMA tensors, the graph's loss (mean
cross-entropy plus FedProto's prototype term and the public-set anchors' pull, export/dema/model.py
`training_loss`), and ORT's `AdamWOptimizer` in adam_mode 1 (Hugging Face AdamW: bias correction folded into the
learning rate, eps added to sqrt(v), no weight decay), restarted with fresh moments each round
(reference/ort-training.md §4-5).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.trainers.base import (
    Batch,
    EvalResult,
    accumulate,
    anchor_inputs,
    checked_prototypes,
    prototype_shape,
    zero_prototypes,
)
from edge_agent.trainers.torch_model import (
    AdapterEncoderClassifier,
    EncoderShape,
    ExpertCounts,
    check_weights,
    count_experts,
    load_torch,
    read_backbone_file,
)
from edge_agent.trainers.torch_vit import VIT_FORMAT, AdapterVitClassifier, VitShape
from protocols.anchors import NO_LABEL
from protocols.bundle_manifest import MANIFEST_NAME, BundleManifest

# ORT's AdamW block defaults (onnxruntime.training.onnxblock.optim.AdamW), as float32 like its kernel.
BETA1 = np.float32(0.9)
BETA2 = np.float32(0.999)
EPS = np.float32(1e-6)


class TorchTrainer:
    name = "torch"

    def __init__(self, bundle_dir: Path, *, threads: int = 0, precision: str = "float32") -> None:
        """``precision="float64"`` runs the same computation in double precision: not for devices, but as the
        exact reference that shows how far float32 rounding alone moves an update (tests/test_image_backbone.py).
        """
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
        self.torch = load_torch()
        self.dtype = getattr(self.torch, precision)
        if threads > 0:
            self.torch.set_num_threads(threads)
        manifest = BundleManifest.model_validate_json((bundle_dir / MANIFEST_NAME).read_text())
        parts = manifest.parts_for(self.name)
        if not parts:
            # Either the encoder is one this backend does not implement (only BERT text and DINOv2 images are,
            # e.g. not MPNet), or the bundle predates torch parts; the coordinator does not assign such a bundle to a
            # torch device, so this is a pinned or hand-fed bundle.
            raise ValueError(
                f"bundle for {manifest.backbone} has no part for the torch backend: the PyTorch trainer implements "
                f"only BERT text and DINOv2 image encoders, so {manifest.backbone} can be trained only on ORT devices "
                "(--backend ort, x86_64). If it is a BERT or DINOv2 backbone, the bundle predates torch parts: "
                "rebuild it with the current exporter")
        (part,) = parts.values()
        weights_path = bundle_dir / part.file
        if not weights_path.exists():
            raise FileNotFoundError(f"{weights_path} is missing: the torch part of the bundle was not fetched")
        self.names = [t.name for t in manifest.tensors]
        self.shapes = {t.name: tuple(t.shape) for t in manifest.tensors}
        self.model = _build_model(weights_path, manifest, count_experts(self.names))
        self.model.weights = {n: w.to(self.dtype) for n, w in self.model.weights.items()}
        from safetensors.numpy import load_file

        # The checkpoint's trainable values: what a tensor not sent by the coordinator starts from, as in ORT.
        self.base = load_file(str(bundle_dir / manifest.initial_tensors))
        self.params: dict[str, Any] = {}
        self.moment1: dict[str, Any] = {}
        self.moment2: dict[str, Any] = {}
        self.step = 0
        self.learning_rate = np.float32(0.0)
        self.prototype_shape = prototype_shape(self.shapes)
        self.prototypes = zero_prototypes(self.prototype_shape)

    # --- TrainerBackend --------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Nothing to preload: the frozen model stays built across rounds and start_round resets the rest."""

    def start_round(self, tensors: Mapping[str, np.ndarray], learning_rate: float) -> None:
        unknown = sorted(set(tensors) - set(self.shapes))
        if unknown:
            raise ValueError(f"tensors {unknown[:3]} are not trainable tensors of this bundle")
        params = {}
        for name in self.names:
            value = tensors[name] if name in tensors else self.base[name]
            if tuple(value.shape) != self.shapes[name]:
                raise ValueError(f"tensor '{name}' has shape {value.shape}, the bundle expects {self.shapes[name]}; "
                                 "the update does not belong to this bundle")
            array = np.array(value, dtype=np.float32, copy=True)
            params[name] = self.torch.from_numpy(array).to(self.dtype).requires_grad_(True)
        self.params = params
        self.moment1 = {n: self.torch.zeros_like(p) for n, p in params.items()}
        self.moment2 = {n: self.torch.zeros_like(p) for n, p in params.items()}
        self.step = 0
        self.learning_rate = np.float32(learning_rate)
        self.prototypes = zero_prototypes(self.prototype_shape)

    def set_prototypes(self, prototypes: np.ndarray, weights: np.ndarray) -> None:
        self._require_round()
        self.prototypes = checked_prototypes(prototypes, weights, self.prototype_shape)

    def train_step(self, batch: Batch) -> float:
        loss = self.forward_backward(batch)
        self.optimizer_step()
        return loss

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        self._require_round()
        torch = self.torch

        def outputs() -> Iterator[tuple[float, np.ndarray, np.ndarray]]:
            for b in batches:
                with torch.no_grad():
                    logits, _representation = self._classify(b)
                    loss = torch.nn.functional.cross_entropy(logits, self._labels(b))  # the pull trains only
                yield float(loss), logits.numpy(), b.labels

        return accumulate(outputs())

    def predict(self, batches: Iterable[Batch]) -> np.ndarray:
        return self._classified(batches, 0)

    def represent(self, batches: Iterable[Batch]) -> np.ndarray:
        return self._classified(batches, 1)

    def _classified(self, batches: Iterable[Batch], index: int) -> np.ndarray:
        """One of ``_classify``'s outputs (0 = logits, 1 = representation) for every example, concatenated."""
        self._require_round()
        with self.torch.no_grad():
            parts = [self._classify(b)[index].numpy().astype(np.float32) for b in batches]
        if parts:
            return np.concatenate(parts)
        classes, rank = self.prototype_shape
        return np.zeros((0, classes if index == 0 else rank), np.float32)

    def read_tensors(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        self._require_round()
        return {n: self.params[n].detach().numpy().astype(np.float32) for n in names}

    # --- finer steps, mirroring OrtTrainer (agreement tests) ------------------------------------------

    def forward_backward(self, batch: Batch) -> float:
        """Loss with fresh gradients (the previous ones are dropped, as ORT's lazy_reset_grad does)."""
        self._require_round()
        for p in self.params.values():
            p.grad = None
        logits, representation = self._classify(batch)
        loss = self._loss(logits, representation, batch)
        loss.backward()
        return float(loss.detach())

    def read_gradients(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        out = {}
        for n in names:
            grad = self.params[n].grad
            out[n] = np.zeros(self.shapes[n], np.float32) if grad is None else grad.numpy().copy()
        return out

    def optimizer_step(self) -> None:
        """ORT's AdamWOptimizer kernel, adam_mode 1, in its float32 order of operations.

        lr_t = lr · sqrt(1 - b2^t) / (1 - b1^t);  m = b1·m + (1-b1)·g;  v = b2·v + (1-b2)·g·g;
        w = w - lr_t · m / (sqrt(v) + eps).  torch.optim.AdamW adds eps after bias-correcting v instead, which
        differs by up to 2e-3 relative on a first step with small gradients (reference/ort-training.md §4).
        """
        self._require_round()
        self.step += 1
        # std::pow(float, int64) is computed in double, then cast back to float, as in the kernel.
        bias1 = np.float32(1.0) - np.float32(math.pow(float(BETA1), self.step))
        bias2 = np.float32(1.0) - np.float32(math.pow(float(BETA2), self.step))
        lr_t = float(self.learning_rate * (np.sqrt(bias2) / bias1))
        keep1, keep2 = float(BETA1), float(BETA2)
        new1, new2 = float(np.float32(1.0) - BETA1), float(np.float32(1.0) - BETA2)
        with self.torch.no_grad():
            for name, param in self.params.items():
                grad = param.grad if param.grad is not None else self.torch.zeros_like(param)
                m, v = self.moment1[name], self.moment2[name]
                m.copy_(keep1 * m + new1 * grad)
                v.copy_(keep2 * v + new2 * grad * grad)
                param.sub_(lr_t * m / (v.sqrt() + float(EPS)))
                param.grad = None

    # --- helpers ---------------------------------------------------------------------------------------

    def _classify(self, batch: Batch) -> tuple[Any, Any]:
        inputs = (self.torch.from_numpy(np.ascontiguousarray(x)) for x in batch.inputs)
        return self.model.classify(self.params, *(x.to(self.dtype) if x.is_floating_point() else x for x in inputs))

    def _loss(self, logits: Any, representation: Any, batch: Batch) -> Any:
        """export/dema/model.py `training_loss` (not imported: the agent never loads the exporter):
        CE over labelled samples + mean_i w[y_i]·[y_i labelled]·mean_r (rep_i - P[y_i])²
        + mean_i a_i·mean_r (rep_i - A_i)²."""
        torch, labels = self.torch, self._labels(batch)
        prototypes, weights = (torch.from_numpy(x).to(self.dtype) for x in self.prototypes)
        anchors, anchor_weights = (torch.from_numpy(x).to(self.dtype)
                                   for x in anchor_inputs(batch, self.prototype_shape[1]))
        labelled = labels >= 0
        known = torch.where(labelled, labels, torch.zeros_like(labels))
        distance = (representation - prototypes[known]).pow(2).mean(dim=-1)
        pull = (weights[known] * labelled.to(distance.dtype) * distance).mean()
        anchored = (anchor_weights * (representation - anchors).pow(2).mean(dim=-1)).mean()
        cross_entropy = (torch.nn.functional.cross_entropy(logits, labels, ignore_index=NO_LABEL, reduction="sum")
                         / labelled.sum().clamp(min=1).to(logits.dtype))
        return cross_entropy + pull + anchored

    def _labels(self, batch: Batch) -> Any:
        return self.torch.tensor(np.asarray(batch.labels), dtype=self.torch.int64)  # a copy: labels may be read-only

    def _require_round(self) -> None:
        if not self.params:
            raise RuntimeError("start_round() must be called before training or evaluating")


def _build_model(weights_path: Path, manifest: BundleManifest, experts: ExpertCounts) -> Any:
    """The plain-PyTorch classifier for the torch part's format (BERT text encoder or DINOv2 ViT), its frozen
    weights checked name by name against the shape the part's metadata declares."""
    metadata, tensors = read_backbone_file(weights_path)
    model: AdapterEncoderClassifier | AdapterVitClassifier
    if metadata.get("format") == VIT_FORMAT:
        vit_shape = VitShape.from_metadata(metadata, weights_path)
        size = (vit_shape.hidden_size, vit_shape.num_hidden_layers)
        weights = check_weights(weights_path, tensors, vit_shape.expected_weights())
        model = AdapterVitClassifier(vit_shape, weights, manifest.slot_blocks, experts)
    else:
        text_shape = EncoderShape.from_metadata(metadata, weights_path)  # names the expected format if it is neither
        size = (text_shape.hidden_size, text_shape.num_hidden_layers)
        weights = check_weights(weights_path, tensors, text_shape.expected_weights())
        model = AdapterEncoderClassifier(text_shape, weights, manifest.slot_blocks, experts)
    if size != (manifest.hidden, manifest.layers):
        raise ValueError(f"torch part is a {size[0]}x{size[1]} encoder, the manifest says "
                         f"{manifest.hidden}x{manifest.layers}")
    return model
