"""`edge-agent predict` on an exported DINOv2 (4 blocks) model with image files and .npz data: a picture of the wrong
size or mode is fixed up and said so once, a damaged one is a clear error, and the same pixels give the same
probabilities whichever way they arrive (PNG file, .npz, the standalone example)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coordinator.datasets import load_fashion_mnist
from edge_agent.inference_package import ModelCard
from edge_agent.model_export import export_tensors
from tests.test_inference_export import uncosted_bundle

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def image_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = uncosted_bundle("dinov2-s4")
    manifest = bundle.manifest
    rng = np.random.default_rng(1)
    tensors = {n: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for n, v in bundle.initial_tensors().items()}
    card = ModelCard(backbone="dinov2-s4", modality="image", labels=manifest.task.labels, max_length=0,
                     image_size=manifest.task.image_size, source="device", run_id="t", rounds=1, method="heterotune",
                     bundle_sha=bundle.sha256)
    out = tmp_path_factory.mktemp("image-package") / "model"
    data = load_fashion_mnist(max_samples=40, seed=4)
    test = ([data.images[i] for i in range(16)], [int(x) for x in data.label_ids[:16]])
    export_tensors(bundle.directory, manifest, tensors, card, out, int8=True, test=test, test_name="16 pictures")
    return out


@pytest.fixture(scope="module")
def pictures() -> np.ndarray:
    return load_fashion_mnist(max_samples=20, seed=3).images[:4]


def test_wrong_size_and_mode_are_fixed_up_and_said_once(image_package: Path, pictures: np.ndarray,
                                                        tmp_path: Path) -> None:
    paths = []
    for i, gray in enumerate(pictures[:2]):
        rgba = np.stack([gray, gray, gray, np.full_like(gray, 255)], axis=-1)
        Image.fromarray(rgba, "RGBA").resize((100, 80)).save(tmp_path / f"rgba{i}.png")
        paths += ["--image", str(tmp_path / f"rgba{i}.png")]
    result = cli("predict", "--model", str(image_package), *paths)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: images in mode RGBA are converted to RGB (alpha dropped)",
                     "note: images not 56x56 are resized to it (bilinear, as in training)"]
    assert len(result.stdout.splitlines()) == 2


def test_the_same_pixels_give_the_same_answer_from_a_file_an_npz_and_the_example(
        image_package: Path, pictures: np.ndarray, tmp_path: Path) -> None:
    rgb = [np.stack([np.kron(p, np.ones((2, 2), np.uint8))] * 3, axis=-1) for p in pictures]  # 56x56 RGB
    args = []
    for i, image in enumerate(rgb):
        Image.fromarray(image, "RGB").save(tmp_path / f"p{i}.png")
        args += ["--image", str(tmp_path / f"p{i}.png")]
    from_files = json.loads(cli("predict", "--model", str(image_package), *args, "--json").stdout)
    np.savez(tmp_path / "pics.npz", images=np.stack(rgb), labels=np.array([0, 1, 2, 3]))
    npz = cli("predict", "--model", str(image_package), "--file", str(tmp_path / "pics.npz"), "--json")
    from_npz = json.loads(npz.stdout)
    assert [p["probabilities"] for p in from_files["predictions"]] == [p["probabilities"]
                                                                      for p in from_npz["predictions"]]
    assert from_files["notes"] == [] and from_npz["accuracy"] is not None  # labelled .npz -> an accuracy
    example = subprocess.run([sys.executable, str(image_package / "predict_example.py"), *args], capture_output=True,
                             text=True, timeout=300)
    assert example.returncode == 0, example.stderr
    assert [line.split("\t")[0] for line in example.stdout.splitlines()] == [p["label"]
                                                                              for p in from_files["predictions"]]


def test_a_damaged_image_or_the_wrong_kind_of_input_is_a_clear_error(image_package: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    result = cli("predict", "--model", str(image_package), "--image", str(tmp_path / "broken.png"))
    assert result.returncode == 2 and "not a readable image" in result.stderr and "Traceback" not in result.stderr
    result = cli("predict", "--model", str(image_package), "--text", "a shoe")
    assert result.returncode == 2 and "image model" in result.stderr
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 28, 28), np.uint8))
    result = cli("predict", "--model", str(image_package), "--file", str(tmp_path / "empty.npz"))
    assert result.returncode == 2 and "holds no inputs" in result.stderr
    np.savez(tmp_path / "floats.npz", images=np.zeros((2, 28, 28), np.float32))
    result = cli("predict", "--model", str(image_package), "--file", str(tmp_path / "floats.npz"))
    assert result.returncode == 2 and "expected uint8" in result.stderr


def test_an_image_model_gets_a_working_int8_copy(image_package: Path, tmp_path: Path, pictures: np.ndarray) -> None:
    """A ViT's patch embedding is a Conv, which onnxruntime's CPU kernels cannot run with int8 weights: the int8
    copy must leave it in float and still load and classify."""
    card = json.loads((image_package / "model_card.json").read_text())
    assert card["int8"]["samples"] == 16 and card["int8"]["size_mb"] < 0.5 * card["int8"]["fp32_size_mb"]
    Image.fromarray(pictures[0], "L").save(tmp_path / "gray.png")
    fp32 = cli("predict", "--model", str(image_package), "--image", str(tmp_path / "gray.png"), "--json")
    int8 = cli("predict", "--model", str(image_package), "--int8", "--image", str(tmp_path / "gray.png"), "--json")
    assert int8.returncode == 0, int8.stderr
    p32 = json.loads(fp32.stdout)["predictions"][0]["probabilities"]
    p8 = json.loads(int8.stdout)["predictions"][0]["probabilities"]
    assert max(abs(p32[k] - p8[k]) for k in p32) < 0.2  # approximate, but the same model
