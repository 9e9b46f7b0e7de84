"""The exported inference graph is the model the device trained: its logits equal the agent's own evaluation
logits within 1e-4 on 64 of the device's samples, for a text (MiniLM-L3) and an image (DINOv2, 4 blocks) backbone,
for a model trained by the ORT backend and one trained by the PyTorch backend; and both backends' devices build the
same graph bytes from the same tensors.

Each model is trained in process by the agent's own `LocalLearner` (real bundle, real pretrained weights, real
data), for one round of a few steps; the package is then written and read back by the same code `edge-agent
export` and `edge-agent predict` run, so the package's tokenizer or image preprocessing is checked too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from coordinator.datasets import FASHION_MNIST_LABELS, load_fashion_mnist, load_tweet_sentiment, write_fleet_data
from edge_agent.agent import make_trainer
from edge_agent.data import ImageExample, Sample, load_examples
from edge_agent.inference_graph import build_inference_model, load_onnx
from edge_agent.inference_package import MODEL, ModelCard, open_package
from edge_agent.local_round import LocalLearner, RoundPlan
from edge_agent.model_export import export_tensors
from edge_agent.predict import Predictor
from export.assets import heterotune_home
from export.bundle import Bundle, BundleRecipe, TaskSpec, build_bundle
from protocols.bundle_manifest import TORCH_PART

TWEET_LABELS = ("negative", "neutral", "positive")
SAMPLES = 64
TOLERANCE = 1e-4
CASES = {"minilm-l3": ("tweet-sentiment", TWEET_LABELS, 64, 8), "dinov2-s4": ("fashion-mnist", FASHION_MNIST_LABELS,
                                                                             64, 8)}


def uncosted_bundle(backbone: str) -> Bundle:
    """The run's bundle recipe, built without cost cards (they are not about inference) in its own cache dir."""
    name, labels, max_length, batch = CASES[backbone]
    return build_bundle(BundleRecipe(backbone, TaskSpec(name, labels, max_length, batch)),
                        root=heterotune_home() / "bundles-uncosted", measure_cost=False, log=False)


@pytest.fixture(scope="module")
def device_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("inference-data")
    text = write_fleet_data(load_tweet_sentiment(max_samples=600, seed=2), ["d1"], tmp / "text", alpha=1.0, seed=2,
                            global_per_class=5, max_per_client=160)
    image = write_fleet_data(load_fashion_mnist(max_samples=600, seed=2), ["d1"], tmp / "image", alpha=1.0, seed=2,
                             global_per_class=2, max_per_client=120)
    return {"minilm-l3": text.client_files["d1"], "dinov2-s4": image.client_files["d1"]}


def trained_learner(bundle: Bundle, backend: str, examples: list[Sample]) -> LocalLearner:
    learner = LocalLearner("d1", bundle.directory, bundle.manifest,
                           make_trainer(backend, bundle.directory, threads=1), examples)
    learner.run_round(RoundPlan(round_id=1, local_steps=4, batch_size=8, learning_rate=2e-2, seed=5,
                                upload_names=()), {})
    return learner


def raw_inputs(samples: list[Sample]) -> list[object]:
    return [s.image if isinstance(s, ImageExample) else s.text for s in samples]


@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("backbone", ["minilm-l3", "dinov2-s4"])
def test_exported_logits_equal_the_agents_own(backbone: str, backend: str, device_files: dict[str, Path],
                                              tmp_path: Path) -> None:
    bundle = uncosted_bundle(backbone)
    examples = load_examples(device_files[backbone], bundle.manifest.task.labels)
    learner = trained_learner(bundle, backend, examples)
    initial = bundle.initial_tensors()
    moved = [n for n in initial if not np.array_equal(initial[n], learner.kept[n])]
    assert "head.weight" in moved and len(moved) > len(initial) // 2  # training really changed the model

    samples = (learner.test + learner.train)[:SAMPLES]
    assert len(samples) == SAMPLES
    encoded = [learner.encoder.encode(samples[i : i + 8]) for i in range(0, SAMPLES, 8)]
    agent_logits = learner.trainer.predict(encoded)  # the agent's own evaluation of its trained weights

    manifest = bundle.manifest
    card = ModelCard(backbone=backbone, modality=manifest.modality, labels=manifest.task.labels,
                     max_length=manifest.task.max_length, image_size=manifest.task.image_size, source="device",
                     run_id="test", rounds=1, method="heterotune", bundle_sha=bundle.sha256, agent_id="d1",
                     backend=backend)
    export_tensors(bundle.directory, manifest, learner.kept, card, tmp_path / "pkg")
    package = open_package(tmp_path / "pkg")
    predictor = Predictor(package.graph_path(), modality=package.card.modality, labels=package.card.labels,
                          max_length=package.card.max_length, image_size=package.card.image_size,
                          tokenizer=package.tokenizer, threads=1)
    exported = np.concatenate([logits for _, logits in predictor.batches(raw_inputs(samples), 16)])

    assert exported.shape == agent_logits.shape == (SAMPLES, len(manifest.task.labels))
    assert float(np.abs(exported - agent_logits).max()) <= TOLERANCE
    # Not vacuous: the untrained model's logits are far from the trained ones.
    learner.trainer.start_round(initial, 0.0)
    untrained = learner.trainer.predict(encoded)
    assert float(np.abs(untrained - agent_logits).max()) > 100 * TOLERANCE

    onnx = load_onnx()
    graph = onnx.load(str(package.directory / MODEL))
    assert [i.name for i in graph.graph.input] == list(package.card.inputs)
    assert [o.name for o in graph.graph.output] == ["logits"]
    assert graph.ir_version <= 10 and max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) <= 17
    assert not {n.op_type for n in graph.graph.node} & {"Dropout", "SoftmaxCrossEntropyLoss"}
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param  # a dynamic batch (and, for text, a dynamic sequence) axis
    if manifest.modality == "text":
        assert graph.graph.input[0].type.tensor_type.shape.dim[1].dim_param


def test_both_backends_devices_build_the_same_graph(tmp_path: Path) -> None:
    """An ORT device has the checkpoint but not the torch part; a torch device has the torch part: the frozen
    weights come from different files, the graph must not differ by a byte."""
    bundle = uncosted_bundle("minilm-l3")
    rng = np.random.default_rng(0)
    tensors = {n: (v + rng.normal(0, 0.02, v.shape)).astype(np.float32) for n, v in bundle.initial_tensors().items()}
    ort_device = tmp_path / "ort-device"
    ort_device.mkdir()
    for path in bundle.directory.iterdir():
        if path.name != bundle.manifest.parts[TORCH_PART].file:
            shutil.copy(path, ort_device / path.name)
    torch_device = tmp_path / "torch-device"  # what a torch device holds: no ORT checkpoint or training graphs
    torch_device.mkdir()
    ort_only = {part.file for part in bundle.manifest.parts_for("ort").values()}
    assert "checkpoint" in ort_only
    for path in bundle.directory.iterdir():
        if path.name not in ort_only:
            shutil.copy(path, torch_device / path.name)
    with_part = build_inference_model(bundle.directory, bundle.manifest, tensors)
    without_part = build_inference_model(ort_device, bundle.manifest, tensors)
    assert with_part == without_part
    assert build_inference_model(torch_device, bundle.manifest, tensors) == with_part
    changed = dict(tensors, **{"head.bias": tensors["head.bias"] + 1})
    assert build_inference_model(bundle.directory, bundle.manifest, changed) != with_part
