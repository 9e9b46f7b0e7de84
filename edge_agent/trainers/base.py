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
    """

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray


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
        """Loss and accuracy of the current weights, without changing them."""

    def read_tensors(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Copies (never views) of the named trainable tensors."""


def accumulate(results: Iterable[tuple[float, np.ndarray, np.ndarray]]) -> EvalResult:
    """Sample-weighted loss and accuracy over (batch loss, logits, labels) triples."""
    loss_sum, correct, total = 0.0, 0, 0
    for loss, logits, labels in results:
        n = int(labels.shape[0])
        loss_sum += float(loss) * n
        correct += int((np.argmax(logits, axis=-1) == labels).sum())
        total += n
    return EvalResult(loss_sum / total if total else float("nan"), correct, total)
