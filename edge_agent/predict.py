"""Classify texts or images with a fine-tuned model, using only onnxruntime's `InferenceSession`.

No torch and no training API: the plain `onnxruntime` package (Linux aarch64 wheels exist) is enough, and on x86
the training build serves the same API. Inputs are turned into the graph's inputs exactly as the agent does during
training and evaluation (edge_agent/data.py TextEncoder, edge_agent/image.py ImageEncoder), so a device's
predictions on its test split give the accuracy it reported.
"""

from __future__ import annotations

import csv
import json
import logging
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.data import CSV_SUFFIXES, JSONL_SUFFIXES, NPZ_SUFFIXES, TextEncoder, _label_index
from edge_agent.image import ImageEncoder

log = logging.getLogger("edge_agent.predict")
MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused before decoding (a decompression bomb guard)


class PredictError(ValueError):
    """An input or model that cannot be classified; the message says what and what to do."""


@dataclass(frozen=True)
class Inputs:
    """What to classify: texts or uint8 images, their display names, and labels where every item has one."""

    items: list[Any]
    names: list[str]
    labels: list[int] | None


class Predictor:
    """One InferenceSession and the preprocessing that matches the graph's inputs."""

    def __init__(self, graph: bytes | Path, *, modality: str, labels: Sequence[str], max_length: int = 0,
                 image_size: int = 0, tokenizer: Path | None = None, threads: int = 1) -> None:
        from edge_agent.ort_api import load_inference_runtime

        ort = load_inference_runtime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        source = graph if isinstance(graph, bytes) else str(graph)
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for a damaged graph
            raise PredictError(f"onnxruntime cannot load the model ({str(exc)[:300]}); export it again") from None
        self.modality, self.labels = modality, tuple(labels)
        names = [i.name for i in self.session.get_inputs()]
        wanted = ["pixel_values"] if modality == "image" else ["input_ids", "attention_mask"]
        if names != wanted or [o.name for o in self.session.get_outputs()] != ["logits"]:
            raise PredictError(f"the model takes {names} and gives {[o.name for o in self.session.get_outputs()]}, "
                               f"not the {wanted} -> ['logits'] of a {modality} model; it is not this package's graph")
        self.text: TextEncoder | None = None
        self.image: ImageEncoder | None = None
        if modality == "image":
            self.image = ImageEncoder(image_size)
        else:
            if tokenizer is None:
                raise PredictError("a text model needs its tokenizer.json")
            self.text = TextEncoder(tokenizer, max_length)
        self.truncated = 0

    def logits(self, items: Sequence[Any]) -> np.ndarray:
        """[len(items), classes] float32 logits of one batch."""
        if self.image is not None:
            feeds = {"pixel_values": self.image.encode(list(items))}
        else:
            assert self.text is not None
            ids, mask, cut = self.text.encode_counting(list(items))
            self.truncated += cut
            feeds = {"input_ids": ids, "attention_mask": mask}
        (out,) = self.session.run(["logits"], feeds)
        logits = np.asarray(out, dtype=np.float32)
        if logits.shape != (len(items), len(self.labels)):
            raise PredictError(f"the model gives logits of shape {logits.shape} for {len(items)} inputs and "
                               f"{len(self.labels)} labels; the model and its labels do not belong together")
        return logits

    def batches(self, items: Sequence[Any], batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start index, logits) per batch, in order."""
        for start in range(0, len(items), batch_size):
            yield start, self.logits(items[start : start + batch_size])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    out: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
    return out


# --- reading inputs --------------------------------------------------------------------------------------------


def _optional_label(raw: object, labels: Sequence[str], where: str) -> int | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    return _label_index(raw, labels, {name: i for i, name in enumerate(labels)}, where)


def _text_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PredictError(f'{where}: not valid JSON ({exc.msg}); each line must be {{"text": "..."}} '
                                       '(a "label" is optional)') from None
                if not isinstance(record, dict):
                    raise PredictError(f'{where}: expected a JSON object with "text", got {type(record).__name__}')
                yield where, record
    else:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return
            if "text" not in reader.fieldnames:
                raise PredictError(f"{path}, line 1: the header {reader.fieldnames} has no 'text' column")
            for row in reader:
                yield f"{path}, line {reader.line_num}", dict(row)


def read_file(path: Path, labels: Sequence[str], modality: str) -> Inputs:
    """A JSONL/CSV of {text[, label]} or an .npz of images[, labels]: the formats `edge-agent join --data` reads,
    with labels optional. An empty file is an error that says so."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in NPZ_SUFFIXES:
        inputs = _read_npz(path, labels)
    elif suffix in JSONL_SUFFIXES + CSV_SUFFIXES:
        items, names, found = [], [], []
        try:
            for where, record in _text_records(path):
                text = record.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise PredictError(f'{where}: "text" is missing or empty; give every record a text')
                items.append(text)
                names.append(text)
                found.append(_optional_label(record.get("label"), labels, where))
        except UnicodeDecodeError as exc:
            raise PredictError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
        except ValueError as exc:
            raise PredictError(str(exc)) from None
        known = [x for x in found if x is not None]
        inputs = Inputs(items, names, known if len(known) == len(items) else None)
    else:
        raise PredictError(f"{path}: unsupported file type {suffix!r}; use one of "
                           f"{', '.join(JSONL_SUFFIXES + CSV_SUFFIXES + NPZ_SUFFIXES)}")
    if not inputs.items:
        raise PredictError(f"{path} holds no inputs; nothing to classify")
    wanted = "image" if modality == "image" else "text"
    given = "image" if suffix in NPZ_SUFFIXES else "text"
    if wanted != given:
        raise PredictError(f"{path} holds {given}s, but the model classifies {wanted}s")
    return inputs


def _read_npz(path: Path, labels: Sequence[str]) -> Inputs:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise PredictError(f"{path}: no 'images' array (found {sorted(archive.files)}); save it with "
                                   "np.savez(path, images=<uint8 [N,H,W] or [N,H,W,3]>[, labels=...])")
            images = archive["images"]
            raw_labels = archive["labels"] if "labels" in archive.files else None
    except (ValueError, zipfile.BadZipFile, EOFError, OSError, AttributeError) as exc:
        raise PredictError(f"{path}: not a valid .npz archive ({exc})") from None
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise PredictError(f"{path}: images are {images.dtype} {images.shape}; expected uint8 [N, H, W] or "
                           "[N, H, W, 3]")
    found: list[int] | None = None
    if raw_labels is not None and raw_labels.ndim == 1 and len(raw_labels) == len(images):
        index = {name: i for i, name in enumerate(labels)}
        if raw_labels.dtype.kind in "iu":
            if ((raw_labels < 0) | (raw_labels >= len(labels))).any():
                raise PredictError(f"{path}: label indices outside 0..{len(labels) - 1}")
            found = [int(x) for x in raw_labels]
        else:
            try:
                found = [_label_index(str(x), labels, index, f"{path}, labels[{i}]")
                         for i, x in enumerate(raw_labels.astype(str).tolist())]
            except ValueError as exc:
                raise PredictError(str(exc)) from None
    return Inputs([images[i] for i in range(len(images))], [f"{path.name}[{i}]" for i in range(len(images))], found)


def read_image(path: Path, image_size: int, notes: list[str]) -> np.ndarray:
    """A picture file as uint8 [H, W] or [H, W, 3] (Pillow decodes it). Other modes are converted, and said so
    (once per kind) in ``notes``; the size is fitted by the model's own resize."""
    try:
        from PIL import Image
    except ImportError:
        raise PredictError("reading image files needs Pillow: pip install pillow (or pass an .npz with --file)") \
            from None
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise PredictError(f"{path}: {width}x{height} pixels is more than {MAX_IMAGE_PIXELS}; shrink it first")
            mode = opened.mode
            image: Any = opened
            if mode not in ("RGB", "L"):
                note = f"images in mode {mode} are converted to RGB" + (" (alpha dropped)" if "A" in mode else "")
                if note not in notes:
                    notes.append(note)
                image = opened.convert("RGB")
            array = np.asarray(image, dtype=np.uint8).copy()
    except PredictError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # what Pillow raises for a damaged or unknown file
        raise PredictError(f"{path}: not a readable image ({exc})") from None
    if (width, height) != (image_size, image_size):
        note = f"images not {image_size}x{image_size} are resized to it (bilinear, as in training)"
        if note not in notes:
            notes.append(note)
    return array


def accuracy(predicted: np.ndarray, labels: Sequence[int] | None) -> float | None:
    if labels is None or not len(labels):
        return None
    return float(np.mean(np.asarray(predicted) == np.asarray(labels)))
