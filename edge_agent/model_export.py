"""`edge-agent export`: a device's saved model -> an inference package (optionally with a dynamic int8 copy).

The int8 copy is measured where it is made: its size, and its accuracy against the fp32 graph's on the device's
own test split (the same 75/25 split the agent evaluated on), both written into the model card.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.data import ImageExample, load_examples, split_local
from edge_agent.device_state import FINAL_EVALUATION_OF, DeviceModel, trained_rounds
from edge_agent.inference_graph import InferenceExportError, build_inference_model
from edge_agent.inference_package import ModelCard, write_package
from edge_agent.predict import Predictor
from protocols.bundle_manifest import MANIFEST_NAME, BundleManifest

INT8_BATCH = 16
INT8_OPS = ("MatMul", "Attention", "Gather")  # what dynamic int8 rewrites (the weights of these ops)


def read_manifest(bundle_dir: Path) -> BundleManifest:
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise InferenceExportError(f"the bundle this model was trained with is no longer at {bundle_dir} (the "
                                   "agent's bundle cache was cleared?); run the agent again to fetch it")
    return BundleManifest.model_validate_json(path.read_text())


def device_card(model: DeviceModel, manifest: BundleManifest) -> ModelCard:
    metrics = dict(model.metrics)
    n_train = metrics.get("n_train")
    return ModelCard(backbone=manifest.backbone, modality=manifest.modality, labels=manifest.task.labels,
                     max_length=manifest.task.max_length if manifest.modality == "text" else 0,
                     image_size=manifest.task.image_size if manifest.modality == "image" else 0,
                     source="device", run_id=model.run_id, rounds=trained_rounds(model.round_id, metrics),
                     # The coordinator does not tell devices its aggregation method's name.
                     method=str(metrics.get("method") or "federated DeMA (method not sent to devices)"),
                     bundle_sha=model.bundle_sha, agent_id=model.agent_id,
                     backend=str(metrics.get("backend") or "?"),
                     training_samples=n_train if isinstance(n_train, int) else None,
                     metrics={k: v for k, v in metrics.items() if k in ("personal_accuracy", "global_accuracy",
                                                                       "n_test", "train_loss", FINAL_EVALUATION_OF)},
                     exported_unix=time.time())


def quantize_int8(graph: bytes) -> bytes:
    """Dynamic int8 quantisation (weights int8, activations quantised at run time) of a merged graph."""
    from edge_agent.ort_api import load_inference_runtime

    load_inference_runtime()  # the training build's stand-in first, then its quantization tool
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise InferenceExportError(f"--int8 needs onnxruntime.quantization and onnx ({exc})") from exc
    with tempfile.TemporaryDirectory(prefix="heterotune-int8-") as tmp:
        source, target = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        source.write_bytes(graph)
        logging.disable(logging.WARNING)  # it advises a pre-processing pass through the root logger; not needed here
        try:
            # Not Conv (a ViT's patch embedding): onnxruntime's CPU kernels have no ConvInteger for int8 weights.
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(INT8_OPS))
        finally:
            logging.disable(logging.NOTSET)
        return target.read_bytes()


def graph_accuracy(graph: bytes, card: ModelCard, tokenizer: Path | None, items: list[Any], labels: list[int],
                   threads: int) -> float:
    predictor = Predictor(graph, modality=card.modality, labels=card.labels, max_length=card.max_length,
                          image_size=card.image_size, tokenizer=tokenizer, threads=threads)
    predicted = np.concatenate([logits.argmax(axis=-1) for _, logits in predictor.batches(items, INT8_BATCH)])
    return float(np.mean(predicted == np.asarray(labels)))


def int8_report(graph: bytes, int8: bytes, card: ModelCard, tokenizer: Path | None,
                test: tuple[list[Any], list[int]] | None, threads: int, where: str) -> dict[str, Any]:
    report: dict[str, Any] = {"file": "model.int8.onnx", "method": "onnxruntime quantize_dynamic, QInt8 weights",
                              "size_mb": round(len(int8) / 1e6, 2), "fp32_size_mb": round(len(graph) / 1e6, 2),
                              "measured_on": "not measured (no --data given)", "samples": 0}
    if test is not None and test[0]:
        items, labels = test
        fp32 = graph_accuracy(graph, card, tokenizer, items, labels, threads)
        q8 = graph_accuracy(int8, card, tokenizer, items, labels, threads)
        report.update(fp32_accuracy=fp32, int8_accuracy=q8, accuracy_change_points=round(100 * (q8 - fp32), 2),
                      samples=len(items), measured_on=where)
    return report


def own_test_split(data: Path, labels: tuple[str, ...]) -> tuple[list[Any], list[int]]:
    """The device's test split exactly as LocalLearner draws it (split_local, 25 %, seed 0)."""
    test = split_local(load_examples(data, labels), test_fraction=0.25, seed=0).test
    return [s.image if isinstance(s, ImageExample) else s.text for s in test], [s.label for s in test]


def export_tensors(bundle_dir: Path, manifest: BundleManifest, tensors: Mapping[str, np.ndarray], card: ModelCard,
                   out: Path, *, int8: bool = False, test: tuple[list[Any], list[int]] | None = None,
                   test_name: str = "", threads: int = 1) -> ModelCard:
    """Build the merged graph for ``tensors`` and write the package (shared by the device and the coordinator)."""
    graph = build_inference_model(bundle_dir, manifest, tensors)
    tokenizer = bundle_dir / manifest.tokenizer if manifest.modality == "text" else None
    int8_graph = None
    if int8:
        int8_graph = quantize_int8(graph)
        card = replace(card, int8=int8_report(graph, int8_graph, card, tokenizer, test, threads, test_name))
    return write_package(out, graph, card, tokenizer=tokenizer, int8_graph=int8_graph)


def export_device_model(model: DeviceModel, out: Path, *, int8: bool = False, data: Path | None = None,
                        threads: int = 1) -> ModelCard:
    manifest = read_manifest(model.bundle_dir)
    card = device_card(model, manifest)
    test = own_test_split(data, manifest.task.labels) if (int8 and data is not None) else None
    where = f"this device's own test split of {data.name}" if data is not None else ""
    return export_tensors(model.bundle_dir, manifest, model.tensors, card, out, int8=int8, test=test,
                          test_name=where, threads=threads)
