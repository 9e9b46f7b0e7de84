"""Private experts (issue 3's "a private expert beside the shared ones"): trained on the device, never sent.

What must hold: the exported bundle lists them as their own family in the local scope, so no method uploads
them; they change the model's output (else they would be dead weight); both trainer backends compute the same
thing with them; and a bundle without them (the default) has none of their tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.config import DemaSettings
from coordinator.federation_state import upload_names
from coordinator.methods import scopes_for
from edge_agent.trainers.ort import OrtTrainer
from edge_agent.trainers.torch_backend import TorchTrainer
from edge_agent.trainers.torch_model import count_experts
from export.bundle import Bundle, BundleRecipe, TaskSpec, build_bundle
from export.dema.config import DemaConfig
from tests.numerics import rel_diff
from tests.test_torch_backend import make_batches, perturbed

LABELS = ("negative", "neutral", "positive")


def tiny_bundle_with(private_experts: int, root: Path) -> Bundle:
    recipe = BundleRecipe("tiny-3", TaskSpec("tweet-sentiment", LABELS), DemaConfig(private_experts=private_experts))
    return build_bundle(recipe, root=root, measure_cost=False, log=False)


@pytest.fixture(scope="module")
def private_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return tiny_bundle_with(1, tmp_path_factory.mktemp("private"))


def test_private_experts_are_local_and_no_method_uploads_them(private_bundle: Bundle) -> None:
    private = [t for t in private_bundle.manifest.tensors if t.family == "private"]
    # 3 slots x 1 expert x (A, B), each as wide as a shared expert.
    assert sorted(t.name for t in private) == sorted(f"adapters.{s}.private.0.{m}.weight"
                                                     for s in range(3) for m in ("a", "b"))
    shared_a = private_bundle.manifest.tensor("adapters.0.experts.0.a.weight")
    assert tuple(private_bundle.manifest.tensor("adapters.0.private.0.a.weight").shape) == tuple(shared_a.shape)
    assert {t.scope for t in private} == {"local"}
    for method in ("heterotune", "heterotune-noalign", "group-fedavg", "local", "fedproto"):
        sent = upload_names(private_bundle.manifest, scopes_for(method, {}))
        assert not [n for n in sent if ".private." in n], method
    assert count_experts([t.name for t in private_bundle.manifest.tensors]) == (4, 1)


def test_the_private_expert_shapes_the_output_and_both_backends_agree(private_bundle: Bundle) -> None:
    start = perturbed(private_bundle.initial_tensors(), seed=3)  # W_out != 0, so every expert reaches the loss
    batches = make_batches(3, seed=7)
    ort = OrtTrainer(private_bundle.directory, threads=1)
    ort.start_round(start, 5e-3)
    with_private = ort.evaluate(batches[:1]).loss
    silenced = {**start, **{n: np.zeros_like(v) for n, v in start.items() if ".private." in n}}
    ort.start_round(silenced, 5e-3)
    assert abs(ort.evaluate(batches[:1]).loss - with_private) > 1e-4  # the private expert is in the graph

    names = list(start)
    after = {}
    for trainer in (OrtTrainer(private_bundle.directory, threads=1), TorchTrainer(private_bundle.directory, threads=1)):
        trainer.start_round(start, 5e-3)
        losses = [trainer.train_step(b) for b in batches]
        after[trainer.name] = (losses, trainer.read_tensors(names))
    (ort_losses, ort_after), (torch_losses, torch_after) = after["ort"], after["torch"]
    assert np.allclose(torch_losses, ort_losses, rtol=1e-4)
    for name in names:
        assert rel_diff(torch_after[name], ort_after[name]) <= 1e-4, name
    private = [n for n in names if ".private." in n]
    assert all(not np.array_equal(ort_after[n], start[n]) for n in private)  # they train


def test_without_private_experts_the_bundle_is_unchanged(tmp_path: Path) -> None:
    plain = tiny_bundle_with(0, tmp_path)
    assert not [t for t in plain.manifest.tensors if t.family == "private"]
    assert count_experts([t.name for t in plain.manifest.tensors]) == (4, 0)
    with pytest.raises(ValueError, match="private_experts"):
        DemaConfig(private_experts=-1)
    with pytest.raises(ValueError):
        DemaSettings(private_experts=-1)
