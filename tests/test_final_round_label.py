"""The state a run's final evaluation saves keeps its round number (N + 1 of an N-round run: resuming relies on
it) but is labelled for people as the final evaluation of round N: in `edge-agent predict`'s model line and in the
exported model card, which says N rounds, not N + 1. A state file's marker is not trusted blindly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.device_state import FINAL_EVALUATION_OF, DeviceModel, round_label, trained_rounds
from edge_agent.inference_package import render_card_md
from edge_agent.model_export import device_card
from export.assets import heterotune_home
from export.bundle import BundleRecipe, TaskSpec, build_bundle


def test_the_final_evaluation_is_labelled_as_the_last_round_it_evaluates() -> None:
    assert round_label(3, {}) == "round 3" and trained_rounds(3, {}) == 3
    assert round_label(6, {FINAL_EVALUATION_OF: 5}) == "the final evaluation of round 5"
    assert trained_rounds(6, {FINAL_EVALUATION_OF: 5}) == 5
    # A damaged or hostile state file: anything but an int below the round number is ignored.
    for bogus in (6, 7, -1, "5", 5.0, True, None):
        assert round_label(6, {FINAL_EVALUATION_OF: bogus}) == "round 6", bogus


def test_the_model_card_of_a_final_state_says_n_rounds_then_the_final_evaluation(tmp_path: Path) -> None:
    bundle = build_bundle(BundleRecipe("minilm-l3", TaskSpec("tweet-sentiment", ("negative", "neutral", "positive"),
                                                             64, 8)),
                          root=heterotune_home() / "bundles-uncosted", measure_cost=False, log=False)
    metrics: dict[str, float | int | str | None] = {"personal_accuracy": 0.5, "n_train": 10, "backend": "ort"}
    state = DeviceModel(agent_id="d1", run_id="r", round_id=6, bundle_sha=bundle.sha256, bundle_dir=bundle.directory,
                        backbone="minilm-l3", labels=bundle.manifest.task.labels, tensors={"x": np.zeros(1)},
                        received={}, optimizer={}, metrics={**metrics, FINAL_EVALUATION_OF: 5}, saved_unix=0.0)
    card = device_card(state, bundle.manifest)
    assert card.rounds == 5 and card.metrics[FINAL_EVALUATION_OF] == 5
    assert "5 round(s), then the final evaluation" in render_card_md(card)
    trained = device_card(DeviceModel(**{**state.__dict__, "round_id": 5, "metrics": metrics}), bundle.manifest)
    assert trained.rounds == 5 and "5 round(s), method" in render_card_md(trained)
