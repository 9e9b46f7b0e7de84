"""Turning a device's samples into the exported graph's inputs, by the bundle's modality.

Text goes through the bundle's tokenizer.json; images through numpy resizing and normalisation at the size the
graphs were exported for. Both run without torch. A data file of the wrong kind for the assigned backbone is
reported before any training, with what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_agent.data import Example, ImageExample, Sample, TextEncoder
from edge_agent.image import ImageEncoder
from edge_agent.trainers.base import Batch
from protocols.bundle_manifest import BundleManifest


class BatchEncoder:
    """Samples -> Batch for one bundle."""

    def __init__(self, bundle_dir: Path, manifest: BundleManifest) -> None:
        self.modality = manifest.modality
        self._text: TextEncoder | None = None
        self._image: ImageEncoder | None = None
        if manifest.modality == "image":
            self._image = ImageEncoder(manifest.task.image_size)
        else:
            self._text = TextEncoder(bundle_dir / manifest.tokenizer, manifest.task.max_length)

    def check(self, samples: Sequence[Sample], where: str) -> None:
        """Every sample must be of the bundle's modality (text examples for text backbones, images for ViTs)."""
        wanted = ImageExample if self.modality == "image" else Example
        wrong = next((s for s in samples if not isinstance(s, wanted)), None)
        if wrong is not None:
            kind = "images (an .npz file with images and labels)" if self.modality == "image" else "text (JSONL/CSV)"
            model = "an image" if self.modality == "image" else "a text"
            raise ValueError(f"{where} holds {type(wrong).__name__} samples, but the assigned backbone is {model} "
                             f"model; give this device {kind}")

    def encode(self, samples: Sequence[Sample]) -> Batch:
        labels = np.array([s.label for s in samples], dtype=np.int64)
        if self._image is not None:
            return Batch((self._image.encode([s.image for s in samples if isinstance(s, ImageExample)]),), labels)
        assert self._text is not None
        ids, mask = self._text.encode([s.text for s in samples if isinstance(s, Example)])
        return Batch((ids, mask), labels)
