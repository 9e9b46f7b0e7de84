"""A learner resumed from the device state continues exactly where the one that was never stopped would: same
kept tensors, and a round the coordinator runs again restarts from the same place (real ORT, tiny-3 bundle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.config import RunConfig, TaskConfig
from coordinator.runner import build_bundles
from edge_agent.data import load_examples
from edge_agent.device_state import load_model
from edge_agent.local_round import LocalLearner, RoundPlan
from edge_agent.round_state import resume_learner, save_round
from edge_agent.trainers.ort import OrtTrainer
from export.bundle import Bundle
from tests.harness import fleet_data

SHA = "d" * 64
RUN = "resume-test-1"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Bundle, Path]:
    tmp = tmp_path_factory.mktemp("resume")
    config = RunConfig(run_name="resume", backbones=("tiny-3",), rounds=2, local_steps=6, min_agents=1,
                       task=TaskConfig(max_length=32, batch_size=8), learning_rate=5e-3)
    bundle = build_bundles(config)["tiny-3"]
    data = fleet_data(tmp, ["dev"])
    return tmp, bundle, data.client_files["dev"]


def _learner(bundle: Bundle, data_file: Path) -> LocalLearner:
    manifest = bundle.manifest
    directory = bundle.directory
    return LocalLearner("dev", directory, manifest, OrtTrainer(directory, threads=1),
                        load_examples(data_file, manifest.task.labels))


def _diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[n].astype(np.float64) - b[n]))) for n in a)


def test_resumed_learner_repeats_a_round_like_the_one_never_stopped(
        setup: tuple[Path, Bundle, Path]) -> None:
    tmp, bundle, data_file = setup
    manifest = bundle.manifest
    shared = tuple(t.name for t in manifest.tensors if t.scope != "local")
    initial = load_file(str(bundle.directory / manifest.initial_tensors))

    def plan(round_id: int) -> RoundPlan:
        return RoundPlan(round_id, 6, 8, 5e-3, 11, shared)

    never_stopped = _learner(bundle, data_file)
    first = never_stopped.run_round(plan(1), {n: initial[n] for n in shared})
    received = first.upload  # as if the coordinator aggregated this one update
    second = never_stopped.run_round(plan(2), received)
    state_dir = tmp / "state"
    assert save_round(state_dir, learner=never_stopped, run_id=RUN, round_id=2, bundle_sha=SHA,
                      bundle_dir=bundle.directory, received=received, outcome=second)
    saved = load_model(state_dir, RUN, bundle_sha=SHA)
    assert set(saved.before) == {t.name for t in manifest.tensors if t.scope == "local"}  # just the head

    restarted = _learner(bundle, data_file)
    assert resume_learner(restarted, state_dir, RUN, SHA) == 2
    assert _diff(restarted.kept, never_stopped.kept) == 0.0
    assert resume_learner(_learner(bundle, data_file), state_dir, "another-run", SHA) is None
    assert resume_learner(_learner(bundle, data_file), state_dir, RUN, "e" * 64) is None

    # The coordinator runs round 2 again (it crashed and resumed): both restart it from before its first attempt.
    again = never_stopped.run_round(plan(2), received)
    resumed_again = restarted.run_round(plan(2), received)
    assert _diff(again.upload, second.upload) <= 1e-6
    assert _diff(resumed_again.upload, again.upload) <= 1e-6
    # Without the saved pre-round head the repeat would start from the trained one and give another upload.
    no_before = _learner(bundle, data_file)
    no_before.restore(saved.tensors)
    assert _diff(no_before.run_round(plan(2), received).upload, again.upload) > 1e-4
