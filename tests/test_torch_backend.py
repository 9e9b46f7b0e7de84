"""The PyTorch backend trains the same bundle as ONNX Runtime and produces the same updates.

The coordinator must not be able to tell the backends apart, so the check is on what leaves the device: the
same real MiniLM-L3 bundle (its torch part and its ORT artifacts) is trained 5 steps on the same batches with
both backends, and every global- and group-scope tensor must agree within 1e-4 relative difference, as must
the losses. Gradients and the first AdamW step are also pinned against a hand-written Hugging Face AdamW.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import RunConfig
from coordinator.runner import build_bundles
from edge_agent.agent import make_trainer, resolve_backend
from edge_agent.bundle_store import BundleError, BundleStore
from edge_agent.trainers.base import Batch
from edge_agent.trainers.ort import OrtTrainer
from edge_agent.trainers.torch_backend import TorchTrainer
from export.bundle import Bundle, BundleRecipe, TaskSpec, build_bundle
from protocols.bundle_manifest import TORCH_PART
from tests.numerics import hf_adamw_first_step, rel_diff

RTOL = 1e-4
STEPS = 5
LR = 5e-3


def make_batches(count: int, seed: int, batch_size: int = 8, seq_len: int = 32) -> list[Batch]:
    """Token batches with padded rows (the attention mask must matter) and all three classes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(1000, 29000, size=(batch_size, seq_len), dtype=np.int64)
        ids[:, 0] = 101
        mask = np.ones_like(ids)
        for row, keep in zip(range(1, batch_size, 2), rng.integers(3, seq_len, size=batch_size), strict=False):
            mask[row, keep:] = 0
            ids[row, keep:] = 0
        out.append(Batch((ids, mask), rng.integers(0, 3, size=batch_size, dtype=np.int64)))
    return out


@pytest.fixture(scope="module")
def minilm_bundle() -> Bundle:
    """The real paraphrase-MiniLM-L3 bundle exactly as a run builds it (reused from the bundle cache)."""
    return build_bundles(RunConfig(backbones=("minilm-l3",)))["minilm-l3"]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    recipe = BundleRecipe("tiny-3", TaskSpec("tweet-sentiment", ("negative", "neutral", "positive")))
    return build_bundle(recipe, root=tmp_path_factory.mktemp("bundles"), measure_cost=False, log=False)


def shared_names(bundle: Bundle) -> list[str]:
    return [t.name for t in bundle.manifest.tensors if t.scope in ("global", "group")]


def train_both(bundle: Bundle, start: dict[str, np.ndarray], batches: list[Batch],
               ) -> dict[str, tuple[list[float], dict[str, np.ndarray], float]]:
    """Each backend: per-step losses, every trainable tensor after the steps, and the eval loss after."""
    out = {}
    names = [t.name for t in bundle.manifest.tensors]
    for trainer in (OrtTrainer(bundle.directory, threads=1), TorchTrainer(bundle.directory, threads=1)):
        trainer.start_round(start, LR)
        losses = [trainer.train_step(b) for b in batches]
        evaluated = trainer.evaluate(batches)
        out[trainer.name] = (losses, trainer.read_tensors(names), evaluated.loss)
    return out


def perturbed(initial: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Every tensor moved off its initial value, so W_out != 0 and every tensor gets a gradient at step 1."""
    rng = np.random.default_rng(seed)
    return {n: (v + rng.normal(0.0, 0.05, v.shape)).astype(np.float32) for n, v in initial.items()}


@pytest.mark.parametrize("start_kind", ["bundle-initial", "perturbed"])
def test_five_steps_give_the_same_upload_on_real_minilm(minilm_bundle: Bundle, start_kind: str) -> None:
    initial = minilm_bundle.initial_tensors()
    start = initial if start_kind == "bundle-initial" else perturbed(initial, seed=3)
    result = train_both(minilm_bundle, start, make_batches(STEPS, seed=7))
    ort_losses, ort_after, ort_eval = result["ort"]
    torch_losses, torch_after, torch_eval = result["torch"]

    for step, (a, b) in enumerate(zip(torch_losses, ort_losses, strict=True)):
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: torch loss {a} vs ort {b}"
    assert abs(torch_eval - ort_eval) <= RTOL * abs(ort_eval)
    upload = shared_names(minilm_bundle)
    assert len(upload) > 20  # every DeMA tensor of 3 slots, not just a few
    worst = max(upload, key=lambda n: rel_diff(torch_after[n], ort_after[n]))
    assert rel_diff(torch_after[worst], ort_after[worst]) <= RTOL, worst
    for name in upload:
        assert not np.array_equal(ort_after[name], start[name]), f"{name} did not train; the check is vacuous"
    # The local head is not uploaded but trains identically too.
    assert rel_diff(torch_after["head.weight"], ort_after["head.weight"]) <= RTOL


def test_gradients_and_first_adamw_step_match_ort_and_the_hf_formula(minilm_bundle: Bundle) -> None:
    start = perturbed(minilm_bundle.initial_tensors(), seed=5)
    names = list(start)
    (batch,) = make_batches(1, seed=11)
    ort, pt = OrtTrainer(minilm_bundle.directory, threads=1), TorchTrainer(minilm_bundle.directory, threads=1)
    for trainer in (ort, pt):
        trainer.start_round(start, LR)
    ort_loss, torch_loss = ort.forward_backward(batch), pt.forward_backward(batch)
    ort_grads, torch_grads = ort.read_gradients(names), pt.read_gradients(names)
    ort.optimizer_step()
    pt.optimizer_step()
    ort_after, torch_after = ort.read_tensors(names), pt.read_tensors(names)

    assert abs(torch_loss - ort_loss) <= RTOL * abs(ort_loss)
    for n in names:
        assert np.abs(ort_grads[n]).max() > 0, f"{n} got no gradient; the comparison would be vacuous"
        assert rel_diff(torch_grads[n], ort_grads[n]) <= RTOL, n
        expected = hf_adamw_first_step(start[n], torch_grads[n], LR)
        assert rel_diff(torch_after[n] - start[n], expected - start[n]) <= 1e-3, n
        assert rel_diff(torch_after[n], ort_after[n]) <= RTOL, n


def test_an_anchored_batch_with_unlabelled_rows_trains_the_same_on_both_backends(minilm_bundle: Bundle) -> None:
    """Public-set anchoring's batches: half the rows unlabelled (-100) with anchors, prototypes set too. Both
    backends must give the same loss and gradients, and the loss must be CE over the labelled rows plus the
    pulls computed by hand from the representation (so a graph that ignored either input would fail)."""
    start = perturbed(minilm_bundle.initial_tensors(), seed=9)
    names = list(start)
    (plain,) = make_batches(1, seed=13)
    rank = start["adapters.0.w_in.weight"].shape[0]
    rng = np.random.default_rng(4)
    labels = plain.labels.copy()
    labels[::2] = -100
    anchors = rng.normal(0.0, 1.0, (len(labels), rank)).astype(np.float32)
    weights = np.where(labels < 0, 2.0, 0.0).astype(np.float32)
    batch = Batch(plain.inputs, labels, anchors, weights)
    prototypes = rng.normal(0.0, 1.0, (3, rank)).astype(np.float32)
    proto_weights = np.array([0.5, 1.0, 0.0], np.float32)
    losses, grads = {}, {}
    for trainer in (OrtTrainer(minilm_bundle.directory, threads=1), TorchTrainer(minilm_bundle.directory, threads=1)):
        trainer.start_round(start, LR)
        reps = trainer.represent([batch])
        logits = trainer.predict([batch])
        trainer.set_prototypes(prototypes, proto_weights)
        losses[trainer.name] = trainer.forward_backward(batch)
        grads[trainer.name] = trainer.read_gradients(names)
    known = labels >= 0
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    cross_entropy = -log_probs[known, labels[known]].mean()
    pull = np.where(known, proto_weights[np.maximum(labels, 0)], 0.0) * ((reps - prototypes[np.maximum(labels, 0)])
                                                                          ** 2).mean(axis=1)
    anchored = weights * ((reps - anchors) ** 2).mean(axis=1)
    expected = cross_entropy + pull.mean() + anchored.mean()
    assert anchored.mean() > 0.1 * expected  # the anchor term is a real part of the loss, not a rounding error
    for name, loss in losses.items():
        assert abs(loss - expected) <= 1e-4 * abs(expected), (name, loss, expected)
    for n in names:
        assert rel_diff(grads["torch"][n], grads["ort"][n]) <= RTOL, n


def test_rounds_restart_with_fresh_moments(tiny_bundle: Bundle) -> None:
    """A second start_round must equal a fresh trainer (ORT reloads its checkpoint for the same reason)."""
    start = perturbed(tiny_bundle.initial_tensors(), seed=1)
    batches = make_batches(3, seed=2)
    used = TorchTrainer(tiny_bundle.directory)
    used.start_round(start, LR)
    for b in batches:
        used.train_step(b)
    used.start_round(start, LR)
    fresh = TorchTrainer(tiny_bundle.directory)
    fresh.start_round(start, LR)
    for b in batches:
        assert used.train_step(b) == fresh.train_step(b)
    names = list(start)
    again, once = used.read_tensors(names), fresh.read_tensors(names)
    assert all(np.array_equal(again[n], once[n]) for n in names)


def test_torch_backend_rejects_foreign_tensors_and_a_missing_part(tiny_bundle: Bundle, tmp_path: Path) -> None:
    trainer = TorchTrainer(tiny_bundle.directory)
    initial = tiny_bundle.initial_tensors()
    with pytest.raises(ValueError, match="does not belong to this bundle"):
        trainer.start_round({"head.weight": np.zeros((7, 7), np.float32)}, LR)
    with pytest.raises(ValueError, match="not trainable tensors"):
        trainer.start_round({**initial, "backbone.embeddings.word_embeddings.weight": initial["head.bias"]}, LR)
    with pytest.raises(RuntimeError, match="start_round"):
        TorchTrainer(tiny_bundle.directory).train_step(make_batches(1, seed=0)[0])
    without_part = tmp_path / "bundle"
    without_part.mkdir()
    for path in tiny_bundle.directory.iterdir():
        if path.name != tiny_bundle.manifest.parts[TORCH_PART].file:
            (without_part / path.name).write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="torch part"):
        TorchTrainer(without_part)


def test_the_torch_part_is_separate_and_only_torch_devices_need_it(tiny_bundle: Bundle, tmp_path: Path) -> None:
    manifest = tiny_bundle.manifest
    part = manifest.parts[TORCH_PART]
    data = tiny_bundle.part_bytes(TORCH_PART)
    assert hashlib.sha256(data).hexdigest() == part.sha256 and len(data) == part.size
    assert part.file not in manifest.files  # not in the tar: an ORT device does not download it
    assert set(manifest.parts_for("torch")) == {TORCH_PART}
    # and the ORT training artefacts are parts for ORT only: a torch device does not download them
    ort_files = {p.file for p in manifest.parts_for("ort").values()}
    assert ort_files == {"checkpoint", "training_model.onnx", "optimizer_model.onnx"}
    assert not ort_files & set(manifest.files) and TORCH_PART not in manifest.parts_for("ort")
    with tarfile.open(fileobj=io.BytesIO(tiny_bundle.archive_bytes())) as tar:
        assert not ort_files & set(tar.getnames())

    store = BundleStore(tmp_path / "cache")
    store.install(tiny_bundle.sha256, tiny_bundle.archive_bytes())
    assert not store.has_part(tiny_bundle.sha256, part)
    with pytest.raises(BundleError, match="fetch it again"):
        store.install_part(tiny_bundle.sha256, part, data[:-1] + bytes([data[-1] ^ 1]))
    assert not store.has_part(tiny_bundle.sha256, part)
    store.install_part(tiny_bundle.sha256, part, data)
    assert store.has_part(tiny_bundle.sha256, part)
    trainer = make_trainer("torch", store.path(tiny_bundle.sha256), threads=1)
    assert trainer.name == "torch"


def test_backend_resolution() -> None:
    assert resolve_backend("torch") == "torch" and resolve_backend("ort") == "ort"
    assert resolve_backend("auto") == "ort"  # ORT is installed here, so it is preferred
    with pytest.raises(ValueError, match="unknown trainer backend"):
        resolve_backend("tensorflow")
