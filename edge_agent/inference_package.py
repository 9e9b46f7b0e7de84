"""The exported inference package: a directory a user copies to any machine and runs with onnxruntime alone.

    model.onnx           merged graph (frozen backbone + fine-tuned adapters + head), inputs -> logits
    model.onnx.data      its weights (ONNX external data, page-aligned: onnxruntime memory-maps them instead of
                         copying them, about 30 % less peak RSS); keep it beside model.onnx
    model.int8.onnx      (--int8) the same graph with dynamic int8 weights (+ model.int8.onnx.data)
    tokenizer.json       text models: the bundle's tokenizer          | preprocess.json  image models: resize + norm
    labels.json          the class names, in logit order
    model_card.json      what it is, where it came from, what it measured, sha256 of every file, the format version
    MODEL_CARD.md        the same for people
    predict_example.py   standalone: needs only onnxruntime, numpy and tokenizers (text) or pillow (images)

Reading a package (`open_package`) checks the format version and every file's sha256 against the card, so a
missing file, a file from another export or a package from a newer exporter is reported instead of run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.image import IMAGENET_MEAN, IMAGENET_STD

PACKAGE_FORMAT = 1
PACKAGE_KIND = "heterotune-inference-package"
MODEL, MODEL_INT8, LABELS, CARD_JSON, CARD_MD, EXAMPLE = (
    "model.onnx", "model.int8.onnx", "labels.json", "model_card.json", "MODEL_CARD.md", "predict_example.py")
MODEL_DATA, MODEL_INT8_DATA = MODEL + ".data", MODEL_INT8 + ".data"  # the graphs' external weights
TOKENIZER, PREPROCESS = "tokenizer.json", "preprocess.json"
MAX_LABELS = 10_000
MAX_CARD_BYTES = 1_000_000
EXAMPLE_SOURCE = Path(__file__).with_name("predict_example_template.py")


class PackageError(ValueError):
    """The directory is not a usable inference package; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ModelCard:
    """Provenance and measurements written beside the graph (model_card.json)."""

    backbone: str
    modality: str
    labels: tuple[str, ...]
    max_length: int  # text: tokens after truncation (0 for images)
    image_size: int  # image: square input side (0 for text)
    source: str  # "device" (a device's own model) or "federation" (a backbone group's aggregate)
    run_id: str
    rounds: int
    method: str
    bundle_sha: str
    agent_id: str = ""
    backend: str = ""
    training_samples: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    int8: dict[str, Any] | None = None
    exported_unix: float = 0.0
    format: int = PACKAGE_FORMAT
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256 (filled by write_package)

    @property
    def inputs(self) -> tuple[str, ...]:
        return ("pixel_values",) if self.modality == "image" else ("input_ids", "attention_mask")

    def to_json(self) -> dict[str, Any]:
        return {"kind": PACKAGE_KIND, "format": self.format, "backbone": self.backbone, "modality": self.modality,
                "labels": list(self.labels), "max_length": self.max_length, "image_size": self.image_size,
                "inputs": list(self.inputs), "output": "logits", "source": self.source, "run_id": self.run_id,
                "rounds": self.rounds, "method": self.method, "bundle_sha": self.bundle_sha,
                "agent_id": self.agent_id, "backend": self.backend, "training_samples": self.training_samples,
                "metrics": self.metrics, "int8": self.int8, "exported_unix": self.exported_unix,
                "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.exported_unix)),
                "opset": 17, "files": dict(sorted(self.files.items()))}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def preprocess_spec(image_size: int) -> dict[str, Any]:
    """How an image becomes ``pixel_values`` (edge_agent/image.py ImageEncoder), for any reimplementation."""
    return {"input": "pixel_values", "layout": "NCHW", "dtype": "float32", "size": [image_size, image_size],
            "steps": ["uint8 RGB (grayscale replicated to 3 channels) / 255",
                      "bilinear resize to size (align_corners=False, half-pixel centres, no antialias)",
                      "(x - mean) / std per channel"],
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def write_package(out: Path, graph: bytes, card: ModelCard, *, tokenizer: Path | None,
                  int8_graph: bytes | None = None) -> ModelCard:
    """Write the package into ``out`` (created; an existing package there is replaced file by file). Returns the
    card with its file hashes. Files are written to a temporary sibling directory first and moved in at the end,
    so an interrupted export never leaves a half package that verifies."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PackageError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / CARD_JSON).is_file():
        raise PackageError(f"{out} is not empty and holds no exported model; choose an empty or new --out "
                           "directory (nothing was written)")
    work = out.with_name(out.name + ".exporting")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _write_graph(work, MODEL, MODEL_DATA, graph)
    if int8_graph is not None:
        _write_graph(work, MODEL_INT8, MODEL_INT8_DATA, int8_graph)
    if card.modality == "image":
        (work / PREPROCESS).write_text(json.dumps(preprocess_spec(card.image_size), indent=2) + "\n")
    else:
        if tokenizer is None or not tokenizer.is_file():
            raise PackageError(f"the bundle's tokenizer {tokenizer} is missing; let the agent fetch the bundle again")
        shutil.copyfile(tokenizer, work / TOKENIZER)
    (work / LABELS).write_text(json.dumps(list(card.labels), indent=2) + "\n")
    shutil.copyfile(EXAMPLE_SOURCE, work / EXAMPLE)
    files = {p.name: sha256_file(p) for p in sorted(work.iterdir())}
    final = ModelCard(**{**card.__dict__, "files": files})
    (work / CARD_MD).write_text(render_card_md(final))
    (work / CARD_JSON).write_text(json.dumps(final.to_json(), indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for stale in (MODEL, MODEL_DATA, MODEL_INT8, MODEL_INT8_DATA, TOKENIZER, PREPROCESS, LABELS, EXAMPLE, CARD_MD,
                  CARD_JSON):
        (out / stale).unlink(missing_ok=True)
    for path in sorted(work.iterdir(), key=lambda p: p.name == CARD_JSON):  # the card last: the commit point
        path.replace(out / path.name)
    work.rmdir()
    return final


def _write_graph(directory: Path, name: str, data_name: str, graph: bytes) -> None:
    """The graph as ``name`` with its weights in ``data_name`` beside it (see externalize_weights)."""
    from edge_agent.inference_graph import externalize_weights

    structure, weights = externalize_weights(graph, data_name)
    (directory / name).write_bytes(structure)
    (directory / data_name).write_bytes(weights)


def _percent(value: Any) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, (int, float)) and math.isfinite(value) else "not measured"


def render_card_md(card: ModelCard) -> str:
    """The human half of the model card."""
    who = (f"device `{card.agent_id}` ({card.backend} backend)" if card.source == "device"
           else f"the federation's aggregate for the `{card.backbone}` group")
    lines = [f"# {card.backbone} fine-tuned classifier", "",
             f"- Base backbone: `{card.backbone}` ({card.modality}), frozen, with DeMA adapters and a linear head",
             f"- Trained by: {who}", f"- Run: `{card.run_id}`, {card.rounds} round(s)"
             f"{', then the final evaluation' if card.metrics.get('final_evaluation_of_round') else ''}, method "
             f"`{card.method}`",
             f"- Labels: {', '.join(card.labels)}",
             f"- Training samples: {card.training_samples if card.training_samples is not None else 'not known'}",
             f"- Personal accuracy (this device's own test split): {_percent(card.metrics.get('personal_accuracy'))}",
             f"- Global accuracy (held-out set, if the run had one): {_percent(card.metrics.get('global_accuracy'))}",
             f"- Exported: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(card.exported_unix))}, package format "
             f"{card.format}, opset 17",
             f"- `model.onnx` sha256: `{card.files.get(MODEL, '?')}`"]
    if card.int8:
        lines.append(f"- `model.int8.onnx` (dynamic int8): {card.int8.get('size_mb', '?')} MB against "
                     f"{card.int8.get('fp32_size_mb', '?')} MB; accuracy {_percent(card.int8.get('fp32_accuracy'))} "
                     f"-> {_percent(card.int8.get('int8_accuracy'))} on {card.int8.get('samples', 0)} samples "
                     f"({card.int8.get('measured_on', 'not measured')})")
    kind = "tokenizers" if card.modality == "text" else "pillow"
    example = '--text "some text"' if card.modality == "text" else "--image photo.jpg"
    lines += ["", "## Run it", "", "```", f"pip install onnxruntime numpy {kind}",
              f"python predict_example.py {example}", "```", "",
              "Or with the agent installed: `edge-agent predict --model . " + example + "`.", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class InferencePackage:
    """A verified package on disk."""

    directory: Path
    card: ModelCard
    raw: Mapping[str, Any]

    def graph_path(self, int8: bool = False) -> Path:
        if int8 and MODEL_INT8 not in self.card.files:
            raise PackageError(f"{self.directory} has no int8 model; export it with `edge-agent export --int8`")
        return self.directory / (MODEL_INT8 if int8 else MODEL)

    @property
    def tokenizer(self) -> Path | None:
        return self.directory / TOKENIZER if self.card.modality == "text" else None


def _field(raw: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value = raw.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PackageError(f"{where}: field '{name}' is missing or not a {kind}; the card is damaged: export again")
    return value


def open_package(directory: Path, *, verify: bool = True) -> InferencePackage:
    """Read and check a package: card present and of a format this code reads, every listed file present and
    unchanged (sha256), labels and sizes plausible."""
    directory = Path(directory)
    card_path = directory / CARD_JSON
    if not directory.is_dir():
        raise PackageError(f"{directory} is not a directory; give the --out directory of `edge-agent export`")
    if not card_path.is_file():
        raise PackageError(f"{directory} has no {CARD_JSON}: it is not an exported model (or the export was "
                           "interrupted); run `edge-agent export --out DIR` again")
    if card_path.stat().st_size > MAX_CARD_BYTES:
        raise PackageError(f"{card_path} is larger than {MAX_CARD_BYTES} bytes; it is not a model card")
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{card_path} is not valid JSON ({exc}); export the model again") from None
    if not isinstance(raw, dict) or raw.get("kind") != PACKAGE_KIND:
        kind = raw.get("kind") if isinstance(raw, dict) else None
        raise PackageError(f"{card_path} is not a HeteroTune model card (kind {kind!r}); this directory holds "
                           "something else")
    fmt = _field(raw, "format", int, card_path)
    if fmt > PACKAGE_FORMAT:
        raise PackageError(f"{directory} was exported by a newer HeteroTune (package format {fmt}; this edge-agent "
                           f"reads format {PACKAGE_FORMAT} and older): upgrade heterotune-edge, or export it again "
                           "with this version")
    if fmt < 1:
        raise PackageError(f"{card_path}: package format {fmt} is not valid")
    labels = _field(raw, "labels", list, card_path)
    if not 2 <= len(labels) <= MAX_LABELS or not all(isinstance(x, str) for x in labels) \
            or len(set(labels)) != len(labels):
        raise PackageError(f"{card_path}: labels must be 2..{MAX_LABELS} distinct names; the card is damaged")
    modality = _field(raw, "modality", str, card_path)
    if modality not in ("text", "image"):
        raise PackageError(f"{card_path}: unknown modality {modality!r}")
    max_length, image_size = _field(raw, "max_length", int, card_path), _field(raw, "image_size", int, card_path)
    if modality == "text" and not 2 <= max_length <= 65536:
        raise PackageError(f"{card_path}: max_length {max_length} is outside 2..65536")
    if modality == "image" and not 1 <= image_size <= 8192:
        raise PackageError(f"{card_path}: image_size {image_size} is outside 1..8192")
    files = _field(raw, "files", dict, card_path)
    needed = [MODEL, LABELS, TOKENIZER if modality == "text" else PREPROCESS]
    for name in needed:
        if name not in files:
            raise PackageError(f"{card_path} lists no {name}; the card is damaged: export again")
    for name, digest in files.items():
        if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(digest, str):
            raise PackageError(f"{card_path}: bad file entry {name!r}; the card is damaged: export again")
        path = directory / name
        if not path.is_file():
            raise PackageError(f"{directory} is missing {name}: copy the whole exported directory, or export again")
        if verify and sha256_file(path) != digest:
            raise PackageError(f"{path} does not belong to this export (its sha256 differs from {CARD_JSON}): it was "
                               "replaced or damaged; copy the whole exported directory again, or export again")
    try:
        on_disk = json.loads((directory / LABELS).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        on_disk = None
    if on_disk != labels:
        raise PackageError(f"{directory / LABELS} does not match the card's labels; export again")
    card = ModelCard(backbone=str(raw.get("backbone", "?")), modality=modality, labels=tuple(labels),
                     max_length=max_length, image_size=image_size, source=str(raw.get("source", "?")),
                     run_id=str(raw.get("run_id", "?")), rounds=int(raw.get("rounds") or 0),
                     method=str(raw.get("method", "?")), bundle_sha=str(raw.get("bundle_sha", "")),
                     agent_id=str(raw.get("agent_id", "")), backend=str(raw.get("backend", "")),
                     training_samples=raw.get("training_samples") if isinstance(raw.get("training_samples"), int)
                     else None, metrics=dict(raw.get("metrics") or {}), int8=raw.get("int8") or None,
                     exported_unix=float(raw.get("exported_unix") or 0.0), format=fmt, files=dict(files))
    return InferencePackage(directory, card, raw)
