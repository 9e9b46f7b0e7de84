"""What `edge-agent predict` and `edge-agent export` do, kept out of cli.py (which only declares the options).

Errors a user can fix (a bad model directory, an empty file, an unreadable image) are printed as one line with
the fix and exit with code 2; nothing here raises a traceback at the user.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from edge_agent.predict import Inputs, PredictError, Predictor, accuracy, read_file, read_image, softmax

EXIT_BAD_INPUT = 2
PREVIEW = 60


@dataclass(frozen=True)
class ModelSource:
    """A loaded model and what predict needs to describe it."""

    predictor: Predictor
    description: str


def from_package(directory: Path, *, int8: bool, threads: int) -> ModelSource:
    from edge_agent.inference_package import open_package

    package = open_package(directory)
    card = package.card
    predictor = Predictor(package.graph_path(int8), modality=card.modality, labels=card.labels,
                          max_length=card.max_length, image_size=card.image_size, tokenizer=package.tokenizer,
                          threads=threads)
    return ModelSource(predictor, f"{card.backbone} from {directory}{' (int8)' if int8 else ''}")


def from_state(state_dir: Path, run: str | None, *, threads: int) -> ModelSource:
    """The device's newest saved model, merged into a graph in memory (needs onnx, like export)."""
    from edge_agent.device_state import load_model, round_label
    from edge_agent.inference_graph import build_inference_model
    from edge_agent.model_export import read_manifest

    model = load_model(state_dir, run)
    manifest = read_manifest(model.bundle_dir)
    graph = build_inference_model(model.bundle_dir, manifest, model.tensors)
    predictor = Predictor(graph, modality=manifest.modality, labels=manifest.task.labels,
                          max_length=manifest.task.max_length, image_size=manifest.task.image_size,
                          tokenizer=model.bundle_dir / manifest.tokenizer if manifest.modality == "text" else None,
                          threads=threads)
    which = round_label(model.round_id, model.metrics)
    return ModelSource(predictor, f"{manifest.backbone}, run {model.run_id} {which} (device {model.agent_id})")


def gather_inputs(predictor: Predictor, texts: Sequence[str], file: Path | None, images: Sequence[Path],
                  stdin: TextIO | None, notes: list[str]) -> Inputs:
    """--text, --file, --image, or stdin lines (texts) when none of them is given."""
    labels = predictor.labels
    if sum((bool(texts), file is not None, bool(images))) > 1:
        raise PredictError("give one kind of input per call: --text, --file or --image")
    if file is not None:
        return read_file(file, labels, predictor.modality)
    if images:
        if predictor.modality != "image":
            raise PredictError("this is a text model; give --text, --file or stdin, not --image")
        size = predictor.image.image_size if predictor.image is not None else 0
        return Inputs([read_image(p, size, notes) for p in images], [str(p) for p in images], None)
    if texts:
        if predictor.modality != "text":
            raise PredictError("this is an image model; give --image FILE or --file images.npz")
        if any(not t.strip() for t in texts):
            raise PredictError("an empty --text has nothing to classify")
        return Inputs(list(texts), list(texts), None)
    if stdin is not None:
        if predictor.modality != "text":
            raise PredictError("reading stdin gives texts, but this is an image model; give --image or --file")
        lines = [line.rstrip("\n") for line in stdin if line.strip()]
        if not lines:
            raise PredictError("stdin held no text; give one text per line, or --text/--file")
        return Inputs(lines, lines, None)
    raise PredictError("nothing to classify: give --text, --file, --image, or pipe texts into stdin")


def classify(predictor: Predictor, inputs: Inputs, batch_size: int, progress: bool) -> np.ndarray:
    """Probabilities for every input, batch by batch, with a progress bar on stderr for long inputs."""
    parts: list[np.ndarray] = []
    if progress and len(inputs.items) > batch_size:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("classifying", total=len(inputs.items))
            for start, logits in predictor.batches(inputs.items, batch_size):
                parts.append(softmax(logits))
                bar.update(task, completed=start + len(logits))
    else:
        parts = [softmax(logits) for _, logits in predictor.batches(inputs.items, batch_size)]
    return np.concatenate(parts)


def report(source: ModelSource, inputs: Inputs, probs: np.ndarray, *, as_json: bool, notes: list[str],
           out: TextIO, err: TextIO) -> None:
    labels = source.predictor.labels
    best = probs.argmax(axis=-1)
    acc = accuracy(best, inputs.labels)
    truncated = source.predictor.truncated
    if truncated:
        text = source.predictor.text
        notes.append(f"{truncated} text(s) longer than {text.max_length if text else '?'} tokens were truncated to "
                     "it (as in training)")
    if as_json:
        doc: dict[str, Any] = {
            "model": source.description,
            "predictions": [{"input": name if isinstance(name, str) else str(name), "label": labels[int(b)],
                             "probability": round(float(p[b]), 6),
                             "probabilities": {lab: round(float(x), 6) for lab, x in zip(labels, p, strict=True)}}
                            for name, b, p in zip(inputs.names, best, probs, strict=True)],
            "accuracy": acc, "notes": notes}
        json.dump(doc, out, indent=2)
        out.write("\n")
        return
    for note in notes:
        print(f"note: {note}", file=err)
    for name, b, p in zip(inputs.names, best, probs, strict=True):
        preview = name if len(name) <= PREVIEW else name[: PREVIEW - 3] + "..."
        print(f"{labels[int(b)]}\t{float(p[b]):.3f}\t{preview}", file=out)
    if acc is not None:
        print(f"accuracy: {acc:.4f} ({round(acc * len(best))}/{len(best)})", file=out)


def run_predict(*, model: Path | None, state_dir: Path | None, run: str | None, texts: Sequence[str],
                file: Path | None, images: Sequence[Path], as_json: bool, batch_size: int, threads: int,
                int8: bool) -> int:
    """`edge-agent predict`; returns the exit code."""
    from edge_agent.device_state import DeviceStateError
    from edge_agent.inference_graph import InferenceExportError
    from edge_agent.inference_package import PackageError

    notes: list[str] = []
    try:
        if (model is None) == (state_dir is None):
            raise PredictError("give exactly one of --model DIR (an exported package) or --state-dir / --data + --id "
                               "(this device's saved model)")
        if batch_size < 1 or batch_size > 4096:
            raise PredictError(f"--batch-size must be 1..4096, got {batch_size}")
        if model is not None:
            source = from_package(model, int8=int8, threads=threads)
        else:
            assert state_dir is not None
            source = from_state(state_dir, run, threads=threads)
        stdin = sys.stdin if not texts and file is None and not images and not sys.stdin.isatty() else None
        inputs = gather_inputs(source.predictor, texts, file, images, stdin, notes)
        probs = classify(source.predictor, inputs, batch_size, progress=file is not None and not as_json)
    except (PredictError, PackageError, InferenceExportError, DeviceStateError, FileNotFoundError,
            ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    report(source, inputs, probs, as_json=as_json, notes=notes, out=sys.stdout, err=sys.stderr)
    return 0


def run_export(*, state_dir: Path, run: str | None, out: Path, int8: bool, data: Path | None, threads: int) -> int:
    """`edge-agent export`; returns the exit code."""
    from edge_agent.device_state import DeviceStateError, load_model
    from edge_agent.inference_graph import InferenceExportError
    from edge_agent.inference_package import PackageError
    from edge_agent.model_export import export_device_model

    try:
        model = load_model(state_dir, run)
        card = export_device_model(model, out, int8=int8, data=data, threads=threads)
    except (DeviceStateError, InferenceExportError, PackageError, PredictError, FileNotFoundError,
            ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"exported {card.backbone} (run {card.run_id}, round {card.rounds}, device {card.agent_id}) to {out}")
    print(f"  model.onnx sha256 {card.files['model.onnx']}")
    if card.int8:
        change = card.int8.get("accuracy_change_points")
        print(f"  model.int8.onnx {card.int8['size_mb']} MB (fp32 {card.int8['fp32_size_mb']} MB)"
              + (f", accuracy change {change:+.2f} points on {card.int8['samples']} samples" if change is not None
                 else ", accuracy not measured (give --data)"))
    kind = '--text "..."' if card.modality == "text" else "--image FILE"
    print(f"try: edge-agent predict --model {out} {kind}")
    return 0
