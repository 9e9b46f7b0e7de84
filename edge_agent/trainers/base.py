"""What every trainer backend offers the join loop, so the coordinator cannot tell them apart."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Batch:
    """The exported graph's inputs in its input order, and int64 labels [B].

    Text: (input_ids, attention_mask), int64 [B, S]. Images: (pixel_values,), float32 [B, 3, H, W].
    A public sample's label is -100 (`export.dema.model.NO_LABEL`): it trains only through its anchor, the
    fleet's mean representation of it (``anchors`` [B, r], weighted per sample by ``anchor_weights`` [B]; both
    None when the batch has no anchor pull).
    """

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray
    anchors: np.ndarray | None = None
    anchor_weights: np.ndarray | None = None


@dataclass(frozen=True)
class EvalResult:
    loss: float
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


class TrainerBackend(Protocol):
    name: str

    def prepare(self) -> None:
        """Optional head start for the next start_round (e.g. loading sessions while the device waits)."""

    def start_round(self, tensors: Mapping[str, np.ndarray], learning_rate: float) -> None:
        """Frozen base weights, the given trainable values written over them, fresh optimizer moments."""

    def train_step(self, batch: Batch) -> float:
        """One forward/backward/AdamW step; returns the batch loss."""

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        """Cross-entropy and accuracy of the current weights, without changing them (no prototype term)."""

    def read_tensors(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Copies (never views) of the named trainable tensors."""

    def set_prototypes(self, prototypes: np.ndarray, weights: np.ndarray) -> None:
        """FedProto's targets for the rest of this round: [classes, r] and per-class weights [classes] (lambda
        where a global prototype exists, else 0). start_round resets both to zeros (plain cross-entropy)."""

    def predict(self, batches: Iterable[Batch]) -> np.ndarray:
        """Logits of every example, [N, classes], without changing weights (consensus distillation)."""

    def represent(self, batches: Iterable[Batch]) -> np.ndarray:
        """The representation of every example, [N, r] (the last adapter's pooled z), without changing weights."""


def prototype_shape(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    """(classes, r) of a bundle's prototype inputs, from its trainable tensors' shapes: the head's rows and the
    adapters' W_in rows (every slot has the same r)."""
    classes = shapes["head.weight"][0]
    ranks = {shape[0] for name, shape in shapes.items() if name.endswith(".w_in.weight")}
    if len(ranks) != 1:
        raise ValueError(f"cannot tell the adapters' r from their W_in shapes (found {sorted(ranks)})")
    return classes, ranks.pop()


def zero_prototypes(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Prototype inputs that switch the prototype term off: zeros [classes, r] and zero weights [classes]."""
    classes, rank = shape
    return np.zeros((classes, rank), np.float32), np.zeros(classes, np.float32)


def checked_prototypes(prototypes: np.ndarray, weights: np.ndarray, shape: tuple[int, int]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The prototype inputs as contiguous float32, or a ValueError naming what does not fit the bundle."""
    prototypes = np.ascontiguousarray(prototypes, dtype=np.float32)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if prototypes.shape != shape or weights.shape != shape[:1]:
        raise ValueError(f"prototypes {prototypes.shape} and weights {weights.shape} do not fit this bundle's "
                         f"{shape[0]} classes x r = {shape[1]}")
    if not (np.isfinite(prototypes).all() and np.isfinite(weights).all()) or (weights < 0).any():
        raise ValueError("prototypes and their weights must be finite, weights >= 0")
    return prototypes, weights


def anchor_inputs(batch: Batch, rank: int, *, pull: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The graphs' anchor inputs for ``batch``: its anchors and weights as contiguous float32, or zeros (no pull)
    when it has none or ``pull`` is off (an evaluation). A ValueError names what does not fit."""
    size = int(np.shape(batch.labels)[0])
    if batch.anchors is None or batch.anchor_weights is None or not pull:
        return np.zeros((size, rank), np.float32), np.zeros(size, np.float32)
    anchors = np.ascontiguousarray(batch.anchors, dtype=np.float32)
    weights = np.ascontiguousarray(batch.anchor_weights, dtype=np.float32)
    if anchors.shape != (size, rank) or weights.shape != (size,):
        raise ValueError(f"anchors {anchors.shape} and weights {weights.shape} do not fit a batch of {size} "
                         f"with r = {rank}")
    if not (np.isfinite(anchors).all() and np.isfinite(weights).all()) or (weights < 0).any():
        raise ValueError("anchors and their weights must be finite, weights >= 0")
    return anchors, weights


def accumulate(results: Iterable[tuple[float, np.ndarray, np.ndarray]]) -> EvalResult:
    """Sample-weighted loss and accuracy over (batch loss, logits, labels) triples."""
    loss_sum, correct, total = 0.0, 0, 0
    for loss, logits, labels in results:
        n = int(labels.shape[0])
        loss_sum += float(loss) * n
        correct += int((np.argmax(logits, axis=-1) == labels).sum())
        total += n
    return EvalResult(loss_sum / total if total else float("nan"), correct, total)
