"""all-mpnet-base-v2 as a third, twice-as-wide text backbone (768 x 12 against MiniLM's 384), trained by ORT only.

What a mixed-width fleet relies on, checked on the real weights and the real bundle a run builds (shared cache):

1. the bundle: 768 x 12, a real cost card, and no torch part or torch card (the PyTorch backend implements BERT
   and DINOv2 only), so the coordinator never offers it to a torch device and a torch agent says why;
2. the exported graph keeps a dynamic sequence axis through MPNet's relative position bias and its position ids
   (derived from the pad id, 1 here, not BERT's 0): logits equal PyTorch's on a padded batch whose batch size and
   length differ from the trace's, and padding a text does not change its logits;
3. ORT trains it: five steps on one repeated batch lower the loss;
4. DeMA's global tensors (gate and experts, in the r-space) have the same shapes and initial values as on
   MiniLM-L3, so they aggregate across widths; only the per-backbone projection into the r-space differs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from coordinator.assignment import DeviceBudget, assign_backbone, cost_cards_of
from coordinator.config import RunConfig
from coordinator.runner import build_bundles
from edge_agent.data import TextEncoder
from edge_agent.ort_api import load_training_api
from edge_agent.trainers.base import Batch
from edge_agent.trainers.ort import OrtTrainer
from edge_agent.trainers.torch_backend import TorchTrainer
from export.bundle import Bundle
from export.catalog import get_backbone
from export.dema import AdapterClassifier, DemaConfig

TRACE_BATCH, TRACE_SEQ = 2, 16  # what export/bundle.py traces with
TEXTS = (
    "the service was quick and the staff were lovely",
    "terrible",
    "an ordinary afternoon with nothing much to report, neither good nor bad, just the usual commute and lunch",
)
LABELS = np.array([2, 0, 1], dtype=np.int64)


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    """The mpnet-base bundle exactly as a run builds it, cost card included (reused from the bundle cache)."""
    return build_bundles(RunConfig(backbones=("mpnet-base",)))["mpnet-base"]


@pytest.fixture(scope="module")
def batch(bundle: Bundle) -> Batch:
    """Real text tokenised by the bundle's own tokenizer, as an agent does: padded to the longest text."""
    encoder = TextEncoder(bundle.directory / bundle.manifest.tokenizer, bundle.manifest.task.max_length)
    assert encoder.pad_id == 1  # MPNet's <pad>; its position ids count the tokens that are not this id
    ids, mask = encoder.encode(TEXTS)
    assert ids.shape[0] != TRACE_BATCH and ids.shape[1] not in (TRACE_SEQ, bundle.manifest.task.max_length)
    assert mask[1].sum() < ids.shape[1] and (ids[1][mask[1] == 0] == 1).all()  # a padded row, padded with <pad>
    return Batch((ids, mask), LABELS)


def test_bundle_is_768_wide_with_an_ort_card_and_no_torch_part(bundle: Bundle) -> None:
    manifest = bundle.manifest
    assert (manifest.backbone, manifest.hidden, manifest.layers, manifest.modality) == ("mpnet-base", 768, 12, "text")
    assert manifest.slot_blocks == (3, 7, 11)
    assert 108_000_000 < manifest.backbone_params < 110_000_000  # 108.9M: all-mpnet-base-v2 without its pooler
    assert set(manifest.parts) == set(manifest.parts_for("ort")) and manifest.parts_for("torch") == {}
    assert manifest.cost_card_by_backend == {}
    card = manifest.cost_card
    assert card is not None
    print(f"mpnet-base card: peak RSS {card.peak_train_rss_mb:.0f} MB, step {card.step_seconds:.2f} s "
          f"(batch {manifest.task.batch_size} x {manifest.task.max_length}), eval {card.eval_seconds_per_sample:.3f} "
          f"s/sample, download {card.bundle_bytes / 1e6:.0f} MB")
    # The checkpoint alone holds 436 MB of frozen weights, and ORT keeps activations for 12 wide blocks: well above
    # MiniLM's ~300 MB, well below the builder's RAM.
    assert 600 < card.peak_train_rss_mb < 4000
    assert 0 < card.step_seconds < 60 and card.eval_seconds_per_sample > 0 and card.builder_gflops > 0
    assert card.bundle_bytes == sum((bundle.directory / name).stat().st_size for name in manifest.files) + sum(
        part.size for part in manifest.parts_for("ort").values())
    assert bundle.size < 5e6 < 400e6 < card.bundle_bytes < 500e6  # the tar; the checkpoint travels as an ORT part


def test_torch_devices_are_not_offered_it_and_a_torch_agent_says_why(bundle: Bundle) -> None:
    (card,) = cost_cards_of(bundle.manifest)
    assert (card.backend, card.trainable_by) == ("ort", ("ort",))
    for backend in ("ort", None):
        roomy = DeviceBudget("pc", memory_budget_mb=8000, gflops=100.0, max_round_seconds=None, backend=backend)
        assert assign_backbone(roomy, [card], local_steps=5, eval_samples=20).backbone == "mpnet-base"
    pi = DeviceBudget("pi", memory_budget_mb=8000, gflops=100.0, max_round_seconds=None, backend="torch")
    decision = assign_backbone(pi, [card], local_steps=5, eval_samples=20)
    assert decision.backbone is None and "no torch part" in decision.reason
    with pytest.raises(ValueError, match="implements only BERT text and DINOv2 image encoders, so mpnet-base can be "
                                         r"trained only on ORT devices"):
        TorchTrainer(bundle.directory)


def _random_trainable(bundle: Bundle) -> dict[str, np.ndarray]:
    """Non-zero values for every trainable tensor: the shipped W_out = 0 would make the adapters invisible."""
    rng = np.random.default_rng(0)
    return {name: (rng.standard_normal(value.shape) * 0.05).astype(np.float32)
            for name, value in bundle.initial_tensors().items()}


def _ort_eval_logits(bundle: Bundle, values: dict[str, np.ndarray], batches: list[Batch]) -> list[np.ndarray]:
    """Logits of the bundle's eval graph, run through ORT's training API as a device runs it."""
    api = load_training_api()
    state = api.CheckpointState.load_checkpoint(str(bundle.directory / "checkpoint"))
    module: Any = api.Module(str(bundle.directory / "training_model.onnx"), state,
                             str(bundle.directory / "eval_model.onnx"))
    for name, value in values.items():
        state.parameters[name].data = value
    module.eval()
    classes, rank = len(bundle.manifest.task.labels), int(bundle.manifest.dema["rank"])
    no_prototypes = (np.zeros((classes, rank), np.float32), np.zeros(classes, np.float32))

    def no_anchors(b: Batch) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((len(b.labels), rank), np.float32), np.zeros(len(b.labels), np.float32)

    return [np.asarray(module(*b.inputs, b.labels, *no_prototypes, *no_anchors(b))[1]) for b in batches]


def test_exported_eval_graph_matches_pytorch_at_a_new_batch_and_length(bundle: Bundle, batch: Batch) -> None:
    values = _random_trainable(bundle)
    model = AdapterClassifier(get_backbone("mpnet-base"), DemaConfig(), len(bundle.manifest.task.labels))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in values.items()}, strict=False)
    # The padded row alone, unpadded: a different length again, and the mask and position ids must make it agree.
    row = int(batch.inputs[1][1].sum())
    alone = Batch((batch.inputs[0][1:2, :row], batch.inputs[1][1:2, :row]), LABELS[1:2])
    ort_logits, ort_alone = _ort_eval_logits(bundle, values, [batch, alone])
    with torch.no_grad():
        torch_logits = model(*(torch.from_numpy(x) for x in batch.inputs)).numpy()
    print(f"max |ORT - PyTorch| = {np.abs(ort_logits - torch_logits).max():.2e} "
          f"(logits up to {np.abs(torch_logits).max():.3f}), batch {batch.inputs[0].shape}")
    np.testing.assert_allclose(ort_logits, torch_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ort_alone[0], ort_logits[1], rtol=1e-4, atol=1e-5)


def test_ort_training_lowers_the_loss(bundle: Bundle, batch: Batch) -> None:
    trainer = OrtTrainer(bundle.directory, threads=2)
    trainer.start_round(bundle.initial_tensors(), learning_rate=5e-3)
    losses = [trainer.train_step(batch) for _ in range(5)]
    print("mpnet-base ORT losses:", [round(x, 4) for x in losses])
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] * 0.8, losses
    moved = trainer.read_tensors(["adapters.0.w_out.weight"])["adapters.0.w_out.weight"]
    assert np.abs(moved).max() > 0  # the adapters train, not only the head


def test_global_dema_tensors_are_shared_across_widths(bundle: Bundle) -> None:
    minilm = AdapterClassifier(get_backbone("minilm-l3"), DemaConfig(), len(bundle.manifest.task.labels))
    small = {t.name: t for t in minilm.tensor_specs()}
    wide = {t.name: t for t in bundle.manifest.tensors}
    assert set(wide) == set(small)
    shared = [n for n, t in wide.items() if t.scope == "global"]
    assert {wide[n].family for n in shared} == {"experts", "w_g"}
    for name in shared:
        assert tuple(wide[name].shape) == small[name].shape, name
    assert tuple(wide["adapters.0.w_in.weight"].shape) == (64, 768)
    assert small["adapters.0.w_in.weight"].shape == (64, 384)
    # Same initial values too (seeded by name only), so round one aggregates like any later round.
    start_small, start_wide = minilm.trainable_state(), bundle.initial_tensors()
    for name in shared:
        np.testing.assert_array_equal(start_wide[name], start_small[name].numpy())
