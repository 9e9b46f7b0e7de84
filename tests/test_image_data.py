"""The image modality: .npz agent files, the numpy ImageEncoder, Fashion-MNIST and image fleets."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from coordinator.datasets import (
    FASHION_MNIST_LABELS,
    ImageDataset,
    LabeledText,
    TextDataset,
    _stratified_subsample,
    load_fashion_mnist,
    read_fleet_data,
    write_fleet_data,
)
from edge_agent.data import Example, ImageExample, Sample, batches, eval_batches, load_examples, split_local
from edge_agent.image import IMAGENET_MEAN, IMAGENET_STD, ImageEncoder

LABELS = ("cat", "dog", "bird")


@pytest.fixture(scope="module")
def fashion() -> ImageDataset:
    return load_fashion_mnist()


def _image_examples(examples: Sequence[Sample]) -> list[ImageExample]:
    """Narrow what load_examples returns, checking every item really is an image."""
    assert all(type(e) is ImageExample for e in examples)
    return [e for e in examples if isinstance(e, ImageExample)]


def _images(n: int, shape: tuple[int, ...] = (4, 6), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ npz files


@pytest.mark.parametrize(
    "labels",
    [
        np.array([2, 0, 1, 1, 0], dtype=np.uint8),
        np.array([2, 0, 1, 1, 0], dtype=np.int64),
        np.array(["bird", "cat", "dog", "dog", "cat"]),
        np.array([b"bird", b"cat", b"dog", b"dog", b"cat"]),
        np.array(["bird", "0", "dog", " dog ", "cat"]),  # the text files' rules: digit strings, stripping
    ],
    ids=["uint8", "int64", "names", "byte-names", "mixed-names"],
)
def test_npz_round_trip_names_and_indices(tmp_path: Path, labels: np.ndarray) -> None:
    images = _images(5)
    path = tmp_path / "d.npz"
    np.savez(path, images=images, labels=labels, extra=np.zeros(3))  # unknown arrays are ignored
    examples = _image_examples(load_examples(path, LABELS))
    assert [e.label for e in examples] == [2, 0, 1, 1, 0]
    for i, e in enumerate(examples):
        assert e.image.dtype == np.uint8 and e.image.shape == (4, 6)
        np.testing.assert_array_equal(e.image, images[i])
        assert not e.image.flags.writeable  # a frozen example really is immutable


def test_npz_rgb_and_compressed(tmp_path: Path) -> None:
    images = _images(3, (5, 7, 3), seed=1)
    path = tmp_path / "rgb.NPZ"  # the suffix is matched case-insensitively, like .jsonl and .csv
    with path.open("wb") as f:  # through a file: numpy would append ".npz" to this name
        np.savez_compressed(f, images=images, labels=np.array([0, 2, 1]))
    examples = _image_examples(load_examples(path, LABELS))
    assert [e.label for e in examples] == [0, 2, 1]
    np.testing.assert_array_equal(np.stack([e.image for e in examples]), images)


def _save(**arrays: Any) -> Callable[[Path], None]:
    return lambda path: np.savez(path, **arrays)


def _write_bytes(data: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(data)


def _save_npy(path: Path) -> None:
    with path.open("wb") as f:
        np.save(f, _images(2))


def _save_object_labels(path: Path) -> None:
    np.savez(path, images=_images(2), labels=np.array([0, "cat"], dtype=object))


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (_save(images=_images(3)), r"missing array\(s\) \['labels'\] \(found \['images'\]\)"),
        (_save(pixels=_images(3), labels=np.arange(3)), r"missing array\(s\) \['images'\]"),
        (_save(images=_images(3).astype(np.float32), labels=np.arange(3)), r"images have dtype float32, expected"),
        (_save(images=_images(3)[0], labels=np.arange(3)), r"shape \(4, 6\), expected \[N, H, W\]"),
        (_save(images=_images(3, (4, 6, 4)), labels=np.arange(3)), r"shape \(3, 4, 6, 4\), expected \[N, H, W\]"),
        (_save(images=_images(3), labels=np.zeros((3, 1), np.int64)), r"labels have shape \(3, 1\)"),
        (_save(images=_images(5), labels=np.arange(3)), r"5 images but 3 labels"),
        (_save(images=_images(3), labels=np.array([0, 1, 3])), r"labels\[2\]: label index 3 is out of range"),
        (_save(images=_images(3), labels=np.array([0, -1, 7])), r"labels\[1\]: label index -1 is out of range"),
        (_save(images=_images(2), labels=np.array(["cat", "hat"])), r"labels\[1\]: unknown label 'hat'"),
        (_save(images=_images(2), labels=np.array([0.0, 1.0])), r"labels array has dtype float64"),
        (_save(images=_images(2), labels=np.array([True, False])), r"labels array has dtype bool"),
        (_save(images=_images(0), labels=np.zeros(0, np.int64)), r"contains no examples"),
        (_write_bytes(b'{"text": "not an archive"}\n'), r"not a valid \.npz file"),
        (_write_bytes(b""), r"not a valid \.npz file"),
        (_write_bytes(b"PK\x03\x04 truncated zip"), r"not a valid \.npz file"),
        (_save_npy, r"single array \(\.npy format\), not an \.npz archive"),
        (_save_object_labels, r"not a valid \.npz file \(.*allow_pickle"),  # never unpickle a data file
    ],
)
def test_npz_errors_name_file_and_fix(tmp_path: Path, write: Callable[[Path], object], message: str) -> None:
    path = tmp_path / "bad.npz"
    write(path)
    with pytest.raises(ValueError, match=message) as info:
        load_examples(path, LABELS)
    assert str(info.value).startswith(str(path))


def test_npz_format_errors_say_how_to_save(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=_images(3))
    with pytest.raises(ValueError, match=r"np\.savez\(path, images=.*labels="):
        load_examples(path, LABELS)
    txt = tmp_path / "d.png"
    txt.write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"unsupported file type '\.png'; use one of .*\.npz"):
        load_examples(txt, LABELS)


# ------------------------------------------------------------------------------- split and batches


def test_split_and_batches_keep_image_examples_and_text_behaviour() -> None:
    """The generic functions pick the same positions for images as for texts, and return images."""
    images = [ImageExample(im, i % 3) for i, im in enumerate(_images(40))]
    texts = [Example(f"t{i}", i % 3) for i in range(40)]
    image_split, text_split = split_local(images, seed=3), split_local(texts, seed=3)
    assert (len(image_split.train), len(image_split.test)) == (30, 10)
    assert [images.index(e) for e in image_split.test] == [texts.index(e) for e in text_split.test]
    assert all(type(e) is ImageExample for e in image_split.train + image_split.test)
    assert {id(e) for e in image_split.train + image_split.test} == {id(e) for e in images}

    image_stream = batches(images, 16, np.random.default_rng(0))
    text_stream = batches(texts, 16, np.random.default_rng(0))
    for _ in range(6):
        assert [images.index(e) for e in next(image_stream)] == [texts.index(e) for e in next(text_stream)]
    got = list(eval_batches(images, 16))
    assert [len(b) for b in got] == [16, 16, 8]
    assert [e for b in got for e in b] == images


# ---------------------------------------------------------------------------------------- the encoder


def _torch_reference(images: list[np.ndarray], size: int) -> np.ndarray:
    """What the builder computes: /255, grayscale to 3 channels, F.interpolate bilinear, normalise."""
    out = []
    for image in images:
        x = torch.from_numpy(image.astype(np.float32)) / 255.0
        x = x.unsqueeze(0).expand(3, -1, -1) if x.ndim == 2 else x.permute(2, 0, 1)
        x = torch.nn.functional.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        out.append(((x - mean) / std)[0].numpy())
    return np.stack(out)


@pytest.mark.parametrize("size", [56, 112, 14, 28, 37])
def test_encoder_matches_torch_on_fashion_mnist(fashion: ImageDataset, size: int) -> None:
    images = [fashion.images[i] for i in (0, 1, 2, 777, 59_999)]
    got = ImageEncoder(size).encode(images)
    assert got.dtype == np.float32 and got.shape == (5, 3, size, size)
    assert got.flags.c_contiguous  # ONNX Runtime takes the buffer as is
    want = _torch_reference(images, size)
    assert float(np.abs(got - want).max()) < 1e-5
    assert float(np.abs(got).max()) > 1.0  # normalised, not left in [0, 1]


@pytest.mark.parametrize(("shape", "size"), [((30, 20, 3), 42), ((20, 30, 3), 42), ((7, 5, 3), 3), ((1, 1), 4)])
def test_encoder_matches_torch_rgb_and_odd_sizes(shape: tuple[int, ...], size: int) -> None:
    images = list(_images(4, shape, seed=5))  # noise: every pixel differs from its neighbours
    got = ImageEncoder(size).encode(images)
    assert got.shape == (4, 3, size, size) and got.flags.c_contiguous
    assert float(np.abs(got - _torch_reference(images, size)).max()) < 1e-5


def test_encoder_layout_is_nchw_rgb_and_grayscale_replicates() -> None:
    rgb = np.empty((5, 9, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 0, 51
    gray = np.full((6, 4), 102, dtype=np.uint8)
    out = ImageEncoder(8).encode([rgb, gray])
    for c, value in enumerate((1.0, 0.0, 0.2)):
        np.testing.assert_allclose(out[0, c], (value - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-6)
        np.testing.assert_allclose(out[1, c], (0.4 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-6)
    custom = ImageEncoder(2, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).encode([gray])
    np.testing.assert_allclose(custom, np.full((1, 3, 2, 2), -0.2), atol=1e-6)


def test_encoder_mixed_batch_equals_one_by_one(fashion: ImageDataset) -> None:
    mixed = [fashion.images[0], _images(1, (30, 20, 3))[0], fashion.images[1], _images(1, (9, 9))[0]]
    enc = ImageEncoder(24)
    together = enc.encode(mixed)
    for i, image in enumerate(mixed):
        np.testing.assert_array_equal(together[i], enc.encode([image])[0])
    stacked = enc.encode(fashion.images[:6])  # a stacked [N, H, W] array is N images
    np.testing.assert_array_equal(stacked, enc.encode(list(fashion.images[:6])))


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "224"])
def test_encoder_rejects_bad_image_size(size: object) -> None:
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        ImageEncoder(size)  # type: ignore[arg-type]


def test_encoder_rejects_bad_images() -> None:
    enc = ImageEncoder(8)
    with pytest.raises(ValueError, match=r"image 1 has dtype float32, expected uint8"):
        enc.encode([_images(1)[0], np.zeros((4, 4), np.float32)])
    with pytest.raises(ValueError, match=r"image 0 has shape \(4, 4, 4\), expected \[H, W\]"):
        enc.encode([np.zeros((4, 4, 4), np.uint8)])
    with pytest.raises(ValueError, match=r"image 0 has shape \(4,\)"):
        enc.encode([np.zeros(4, np.uint8)])
    with pytest.raises(ValueError, match=r"at least 1x1"):
        enc.encode([np.zeros((0, 4), np.uint8)])
    with pytest.raises(ValueError, match=r"image 0 is a list"):
        enc.encode([[[0, 1], [2, 3]]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single image"):
        enc.encode(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="no images"):
        enc.encode([])
    with pytest.raises(ValueError, match="std"):
        ImageEncoder(8, std=(0.2, 0.0, 0.2))


def test_image_module_imports_no_heavy_frameworks() -> None:
    code = (
        "import sys, edge_agent.image, edge_agent.data\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'onnx', 'PIL'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -------------------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_matches_published_counts(fashion: ImageDataset) -> None:
    test = load_fashion_mnist(split="test")
    assert fashion.labels == test.labels == FASHION_MNIST_LABELS and len(FASHION_MNIST_LABELS) == 10
    assert fashion.images.shape == (60_000, 28, 28) and test.images.shape == (10_000, 28, 28)
    assert fashion.images.dtype == np.uint8 and fashion.label_array().dtype == np.int64
    assert np.bincount(fashion.label_array()).tolist() == [6_000] * 10
    assert np.bincount(test.label_array()).tolist() == [1_000] * 10
    assert fashion.label_array()[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published order
    assert test.label_array()[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert fashion.images.max() == 255 and fashion.images.min() == 0
    assert not fashion.images.flags.writeable and not fashion.label_ids.flags.writeable
    assert (fashion.name, test.name) == ("fashion-mnist", "fashion-mnist-test")


def test_fashion_mnist_subsample_is_seeded_stratified_subset(fashion: ImageDataset) -> None:
    a = load_fashion_mnist(max_samples=1000, seed=1)
    b = load_fashion_mnist(max_samples=1000, seed=1)
    c = load_fashion_mnist(max_samples=1000, seed=2)
    assert a.images.shape == (1000, 28, 28)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.label_ids, b.label_ids)
    assert not np.array_equal(a.images, c.images)
    assert np.bincount(a.label_array()).tolist() == [100] * 10
    full = {(fashion.images[i].tobytes(), int(fashion.label_ids[i])) for i in range(len(fashion.label_ids))}
    assert all((a.images[i].tobytes(), int(a.label_ids[i])) in full for i in range(1000))
    assert np.bincount(load_fashion_mnist(max_samples=1005).label_array()).tolist() == [101] * 5 + [100] * 5
    assert np.bincount(load_fashion_mnist(max_samples=10).label_array()).tolist() == [1] * 10
    with pytest.raises(ValueError, match="fewer than the 10 labels"):
        load_fashion_mnist(max_samples=9)
    with pytest.raises(ValueError, match="max_samples"):
        load_fashion_mnist(max_samples=0)
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist(split="val")


def test_stratified_subsample_keeps_rare_labels(fashion: ImageDataset) -> None:
    """A label with a tiny share still keeps one sample; a label with none is no obstacle."""
    idx = np.concatenate([np.flatnonzero(fashion.label_ids == 0)[:990], np.flatnonzero(fashion.label_ids == 1)[:10]])
    skewed = ImageDataset("skewed", LABELS, fashion.images[idx], np.where(fashion.label_ids[idx] == 0, 0, 1))
    sub = _stratified_subsample(skewed, 50, seed=0)
    assert np.bincount(sub.label_array(), minlength=3).tolist() == [49, 1, 0]
    assert np.bincount(_stratified_subsample(skewed, 500, seed=0).label_array()).tolist() == [495, 5]
    with pytest.raises(ValueError, match="fewer than the 2 labels present"):
        _stratified_subsample(skewed, 1, seed=0)


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], data: bytes) -> None:
    header = np.array([magic, *dims], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + data)


def test_fashion_mnist_missing_or_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(root=tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    images = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(labels, 0x801, (3,), bytes([1, 2, 3]))
    _write_idx(images, 0x801, (3, 28, 28), bytes(3 * 28 * 28))  # a labels magic on an images file
    with pytest.raises(ValueError, match=r"magic number 0x00000801, expected 0x00000803"):
        load_fashion_mnist(root=tmp_path, split="train")
    _write_idx(images, 0x803, (3, 28, 28), bytes(2 * 28 * 28))
    with pytest.raises(ValueError, match=r"truncated or corrupt"):
        load_fashion_mnist(root=tmp_path, split="train")
    _write_idx(images, 0x803, (4, 28, 28), bytes(4 * 28 * 28))
    with pytest.raises(ValueError, match=r"4 images in .* but 3 labels"):
        load_fashion_mnist(root=tmp_path, split="train")
    images.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"not a readable gzip file"):
        load_fashion_mnist(root=tmp_path, split="train")


def test_image_dataset_validates_and_protects_its_arrays() -> None:
    mine = _images(4)
    ds = ImageDataset("x", LABELS, mine, np.array([0, 1, 2, 0], dtype=np.int32))
    assert ds.label_array().dtype == np.int64 and not ds.images.flags.writeable
    assert mine.flags.writeable  # the caller's own array is left alone
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset("x", LABELS, mine.astype(np.float32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="one integer per image"):
        ImageDataset("x", LABELS, mine, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        ImageDataset("x", LABELS, mine, np.array([0, 1, 2, 3]))


# ------------------------------------------------------------------------------------------- fleets


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return f["images"], f["labels"]


def test_image_fleet_round_trip(tmp_path: Path) -> None:
    ds = load_fashion_mnist(max_samples=3000, seed=0)
    agents = ["cam-0", "cam-1", "cam-2", "cam-3"]
    fleet = write_fleet_data(ds, agents, tmp_path, alpha=0.5, seed=1, global_per_class=50)
    assert fleet.dataset == "fashion-mnist" and fleet.labels == FASHION_MNIST_LABELS
    assert fleet.global_test_file == tmp_path / "global_test.npz"
    assert {a: p.name for a, p in fleet.client_files.items()} == {a: f"{a}.npz" for a in agents}
    assert not (tmp_path / "global_test.jsonl").exists()

    images, labels = _npz_arrays(fleet.global_test_file)
    assert images.dtype == np.uint8 and images.shape == (500, 28, 28) and labels.dtype == np.int64
    test_examples = _image_examples(load_examples(fleet.global_test_file, ds.labels))
    assert np.bincount([e.label for e in test_examples], minlength=10).tolist() == [50] * 10
    test_bytes = {e.image.tobytes() for e in test_examples}
    assert len(test_bytes) == 500

    summary = json.loads((tmp_path / "fleet.json").read_text())
    assert summary["global_test"] == {"file": "global_test.npz", "size": 500, "label_counts": [50] * 10}
    seen: set[bytes] = set()
    for agent in agents:
        examples = _image_examples(load_examples(fleet.client_files[agent], ds.labels))
        counts = np.bincount([e.label for e in examples], minlength=10).tolist()
        assert counts == fleet.label_counts[agent] == summary["clients"][agent]["label_counts"]
        assert summary["clients"][agent]["file"] == f"clients/{agent}.npz"
        assert summary["clients"][agent]["size"] == len(examples) >= 10
        blobs = {e.image.tobytes() for e in examples}
        assert len(blobs) == len(examples)
        assert not blobs & test_bytes, "global test leaked into an agent's data"
        assert not blobs & seen, "two agents share an image"
        seen |= blobs
    assert len(seen) + len(test_bytes) == 3000  # without a cap, nothing is lost
    assert max(max(c) / sum(c) for c in fleet.label_counts.values()) > 0.3  # label-skewed, not IID
    assert read_fleet_data(tmp_path) == fleet


def test_image_fleet_uses_the_same_split_as_text(tmp_path: Path) -> None:
    """Same labels and seed give the same per-agent label counts, whatever the modality."""
    images = load_fashion_mnist(max_samples=2000, seed=4)
    texts = TextDataset(
        "as-text",
        images.labels,
        tuple(LabeledText(f"image {i}", int(y)) for i, y in enumerate(images.label_array())),
    )
    kwargs = {"alpha": 0.3, "seed": 9, "global_per_class": 20, "max_per_client": 150}
    a = write_fleet_data(images, ["p", "q", "r"], tmp_path / "img", **kwargs)  # type: ignore[arg-type]
    b = write_fleet_data(texts, ["p", "q", "r"], tmp_path / "txt", **kwargs)  # type: ignore[arg-type]
    assert a.label_counts == b.label_counts
    for agent in ("p", "q", "r"):
        image_labels = _npz_arrays(a.client_files[agent])[1].tolist()
        text_labels = [e.label for e in load_examples(b.client_files[agent], texts.labels)]
        assert image_labels == text_labels  # same samples, in the same order


def test_image_fleet_is_seeded(tmp_path: Path) -> None:
    ds = load_fashion_mnist(max_samples=1500, seed=0)
    a = write_fleet_data(ds, ["x", "y"], tmp_path / "a", seed=5, global_per_class=20)
    b = write_fleet_data(ds, ["x", "y"], tmp_path / "b", seed=5, global_per_class=20)
    c = write_fleet_data(ds, ["x", "y"], tmp_path / "c", seed=6, global_per_class=20)
    for got, want in zip(_npz_arrays(a.client_files["x"]), _npz_arrays(b.client_files["x"]), strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(_npz_arrays(a.global_test_file)[0], _npz_arrays(c.global_test_file)[0])


def test_image_fleet_drops_exact_copies_of_global_test_images(tmp_path: Path, fashion: ImageDataset) -> None:
    base = np.arange(0, 60_000, 100)  # 600 real images
    copies = base[::2]  # and a second copy of every other one
    idx = np.concatenate([base, copies])
    ds = ImageDataset("with-copies", fashion.labels, fashion.images[idx], fashion.label_ids[idx])
    fleet = write_fleet_data(ds, ["p", "q"], tmp_path, seed=0, global_per_class=15, min_per_client=5)
    test_bytes = {im.tobytes() for im in _npz_arrays(fleet.global_test_file)[0]}
    for path in fleet.client_files.values():
        assert not {im.tobytes() for im in _npz_arrays(path)[0]} & test_bytes
    summary = json.loads((tmp_path / "fleet.json").read_text())
    assert summary["split"]["dropped_duplicates_of_global_test"] > 0
