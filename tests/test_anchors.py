"""Public-set anchoring (issue 3's "an alignment loss on a small public unlabelled set"): rule, device, federation.

As this project defines it: every device of a run holds the same public set of P unlabelled samples. After its
local steps a device sends ``anchor.repr``, its representation of every public sample (the last adapter's pooled
z, P x r). The coordinator sends back the n_k-weighted mean of those tables (fleet-wide for heterotune, per
backbone group for group-fedavg), and next round the device interleaves anchor steps: batches of public samples,
labelled -100 (no cross-entropy), whose loss is weight x mean squared distance to their anchors. Tiny random-init
backbones: this is about the plumbing and the arithmetic; whether it helps is the benchmark's question.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from bench.methods_federation import AgentSpec, run_inprocess
from coordinator.aggregation import ClientUpdate, FederatedState
from coordinator.config import RunConfig
from coordinator.federation_state import initial_state, payload_bytes, upload_names
from coordinator.methods import anchoring_scope, public_samples_for, scopes_for, strategy_for
from coordinator.runner import build_bundles, run_federation
from coordinator.store import load_state
from edge_agent.agent import EXIT_FINISHED
from edge_agent.anchors import anchor_table, anchor_targets
from edge_agent.data import Sample, eval_batches, load_examples
from edge_agent.local_round import RoundPlan
from export.bundle import Bundle
from export.dema import training_loss
from protocols.anchors import ANCHOR_REPR, NO_LABEL
from tests.harness import agent_processes
from tests.public_set import (
    LABELS,
    PINS,
    PUBLIC,
    assert_round_one_is_plain_and_round_two_is_not,
    assert_rounds_commit_weighted_tables,
    device_learner,
    fleet_with_public,
    public_config,
    public_file,
)


def _config(method: str = "heterotune", anchor_steps: int = 2) -> RunConfig:
    return public_config("anchor", method, anchor_steps=anchor_steps)


# ------------------------------------------------------------------------------------------ pure arithmetic


def test_loss_with_an_unlabelled_sample_on_hand_computed_tensors() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, NO_LABEL])
    representation = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    prototypes = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    anchors = torch.tensor([[9.0, 9.0], [1.0, 1.0]])
    # CE over the labelled sample only: log(1 + e^-1). Prototype pull, weight 0.5 for class 0: sample 0 is
    # mean(1², 2²) = 2.5 -> 1.25, sample 1 is unlabelled -> 0; mean over the batch 0.625. Anchor pull, weights
    # (0, 2): sample 1 is mean((3-1)², (5-1)²) = 10 -> 20, mean over the batch 10.
    loss = training_loss(logits, representation, labels, prototypes, torch.tensor([0.5, 0.5]), anchors,
                         torch.tensor([0.0, 2.0]))
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)) + 0.625 + 10.0, rel=1e-6)


def test_a_batch_of_public_samples_only_trains_through_its_anchors() -> None:
    representation = torch.tensor([[1.0, 2.0], [3.0, 5.0]], requires_grad=True)
    labels = torch.tensor([NO_LABEL, NO_LABEL])
    loss = training_loss(torch.zeros(2, 3), representation, labels, torch.zeros(3, 2), torch.ones(3),
                         torch.zeros(2, 2), torch.tensor([1.0, 0.0]))
    # no CE (0, not NaN), no prototype pull: sample 0's anchor term mean(1², 2²) = 2.5, over a batch of 2
    assert float(loss.detach()) == pytest.approx(1.25)
    loss.backward()
    assert representation.grad is not None
    # d/dz of mean_i a_i mean_r (z - A)²: a_0 * 2 (z_0 - 0) / (r * B) = (0.5, 1.0); sample 1 has weight 0
    np.testing.assert_allclose(representation.grad.numpy(), [[0.5, 1.0], [0.0, 0.0]])


def test_device_side_tables_refuse_what_cannot_be_anchors() -> None:
    assert anchor_table(np.zeros((3, 2)), 3, 2) is None  # round 0: none yet
    table = anchor_table(np.arange(6.0).reshape(3, 2), 3, 2)
    assert table is not None
    targets, weights = anchor_targets(table, np.array([2, 0]), 0.5)
    np.testing.assert_array_equal(targets, [[4.0, 5.0], [0.0, 1.0]])
    np.testing.assert_array_equal(weights, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"need \(3, 4\)"):
        anchor_table(np.ones((3, 2)), 3, 4)
    with pytest.raises(ValueError, match="non-finite"):
        anchor_table(np.array([[np.nan, 1.0]]), 1, 2)


def _update(agent: str, group: str, n: int, **tensors: list[Any]) -> ClientUpdate:
    return ClientUpdate(agent, group, n, {k.replace("reps", ANCHOR_REPR): np.array(v, np.float32)
                                          for k, v in tensors.items()})


def test_fleet_wide_anchors_on_hand_computed_tensors() -> None:
    strategy = strategy_for(RunConfig(method="heterotune-noalign", anchor_steps=1, public_samples=2))
    assert strategy.name == "heterotune-noalign+anchoring"
    state = FederatedState({"g": np.zeros(2, np.float32), ANCHOR_REPR: np.zeros((2, 2), np.float32)},
                           {"s": {}, "l": {}})
    updates = [_update("a", "s", 1, g=[1.0, 0.0], reps=[[4.0, 0.0], [1.0, -1.0]]),
               _update("b", "l", 3, g=[5.0, 4.0], reps=[[0.0, 4.0], [1.0, 3.0]])]
    result = strategy.aggregate(state, updates, 1)
    np.testing.assert_allclose(result.state.global_tensors["g"], [4.0, 3.0])  # the inner rule, untouched
    # (1 * a + 3 * b) / 4, across the two backbone groups
    np.testing.assert_allclose(result.state.global_tensors[ANCHOR_REPR], [[1.0, 3.0], [1.0, 2.0]], rtol=1e-6)
    assert result.diagnostics["anchoring"] == {"scope": "global"}


def test_group_anchors_stay_within_each_backbone_group() -> None:
    config = RunConfig(method="group-fedavg", anchor_steps=1, public_samples=1)
    assert anchoring_scope(config) == "group"
    state = FederatedState({}, {g: {"w": np.zeros(1, np.float32), ANCHOR_REPR: np.zeros((1, 2), np.float32)}
                                for g in ("s", "l", "idle")})
    state.group_tensors["idle"][ANCHOR_REPR] = np.array([[0.3, 0.7]], np.float32)
    updates = [_update("a", "s", 1, w=[2.0], reps=[[2.0, 0.0]]), _update("b", "s", 1, w=[4.0], reps=[[0.0, 4.0]]),
               _update("c", "l", 2, w=[8.0], reps=[[-1.0, 5.0]])]
    result = strategy_for(config).aggregate(state, updates, 1).state
    np.testing.assert_allclose(result.group_tensors["s"][ANCHOR_REPR], [[1.0, 2.0]])
    np.testing.assert_allclose(result.group_tensors["l"][ANCHOR_REPR], [[-1.0, 5.0]])  # nothing from group s
    np.testing.assert_allclose(result.group_tensors["idle"][ANCHOR_REPR], [[0.3, 0.7]])  # no update: kept


def test_a_bad_representation_table_is_refused_with_the_agent_named() -> None:
    strategy = strategy_for(RunConfig(method="heterotune", anchor_steps=1, public_samples=1))
    state = FederatedState({ANCHOR_REPR: np.zeros((1, 2), np.float32)}, {"s": {}})
    good = _update("a", "s", 1, reps=[[0.5, 0.5]])
    for bad, why in ((_update("bad-agent", "s", 1, reps=[[np.inf, 1.0]]), "non-finite value"),
                     (_update("bad-agent", "s", 1, reps=[[0.5, 0.5, 0.5]]), r"expected \(1, 2\)"),
                     (ClientUpdate("bad-agent", "s", 1, {}), "lacks 'anchor.repr'")):
        with pytest.raises(ValueError, match=f"bad-agent.*{why}"):
            strategy.aggregate(state, [good, bad], 1)


def test_an_anchoring_run_needs_a_public_set_a_sharing_method_and_no_distillation() -> None:
    with pytest.raises(ValidationError, match="anchor_steps needs a public set"):
        RunConfig(anchor_steps=2)
    with pytest.raises(ValidationError, match="not both"):
        RunConfig(anchor_steps=2, distill_steps=2, public_samples=4)
    with pytest.raises(ValueError, match="shares no experts"):
        anchoring_scope(RunConfig(method="local", anchor_steps=2, public_samples=4))
    assert anchoring_scope(RunConfig(method="heterotune", anchor_steps=2, public_samples=4)) == "global"
    assert public_samples_for(RunConfig(method="heterotune", anchor_steps=2, public_samples=4)) == 4
    assert public_samples_for(RunConfig(method="heterotune", public_samples=4)) == 0  # named, not used


# --------------------------------------------------------------------------------- state, names and data


@pytest.fixture(scope="module")
def bundles() -> dict[str, Bundle]:
    return build_bundles(_config())


def test_state_and_uploads_carry_one_representation_table(bundles: dict[str, Bundle]) -> None:
    manifest = bundles["tiny-3"].manifest
    rank = int(manifest.dema["rank"])
    scopes = scopes_for("heterotune")
    plain = upload_names(manifest, scopes)
    names = upload_names(manifest, scopes, public_samples=PUBLIC, public_kind="anchor")
    assert sorted(set(names) - set(plain)) == [ANCHOR_REPR]
    extra = payload_bytes(manifest, names, public_samples=PUBLIC, public_kind="anchor") - payload_bytes(manifest,
                                                                                                       plain)
    assert extra == 4 * PUBLIC * rank
    fleet = initial_state(bundles, scopes, public_samples=PUBLIC, public_kind="anchor")
    np.testing.assert_array_equal(fleet.global_tensors[ANCHOR_REPR], np.zeros((PUBLIC, rank)))
    grouped = initial_state(bundles, scopes_for("group-fedavg"), public_samples=PUBLIC, public_scope="group",
                            public_kind="anchor")
    assert ANCHOR_REPR not in grouped.global_tensors
    assert all(t[ANCHOR_REPR].shape == (PUBLIC, rank) for t in grouped.group_tensors.values())


@pytest.fixture(scope="module")
def device_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Sample], list[Sample]]:
    data = fleet_with_public(tmp_path_factory.mktemp("device") / "data")
    return load_examples(data.client_files["a1"], LABELS), load_examples(public_file(data), LABELS)


# ------------------------------------------------------------------------------------------- the device


def test_anchor_steps_pull_the_public_representations_towards_the_anchors(
        bundles: dict[str, Bundle], device_data: tuple[list[Sample], list[Sample]]) -> None:
    bundle = bundles["tiny-3"]
    examples, public = device_data
    rank = int(bundle.manifest.dema["rank"])
    names = tuple(upload_names(bundle.manifest, scopes_for("heterotune"), public_samples=PUBLIC,
                               public_kind="anchor"))
    probe = device_learner(bundle, examples, public)
    probe.trainer.start_round(probe.kept, 5e-3)
    # Anchors a fleet could agree on: this device's own representation of the public set, moved by 0.5
    before = probe.trainer.represent(probe.encoder.encode(c) for c in eval_batches(public, 8))
    anchors = (before + 0.5).astype(np.float32)
    outcomes = {}
    for steps, table in ((0, anchors), (6, anchors), (6, np.zeros_like(anchors))):
        learner = device_learner(bundle, examples, public)
        outcome = learner.run_round(RoundPlan(1, 6, 8, 5e-3, 0, names, anchor_steps=steps, anchor_weight=1.0),
                                    {ANCHOR_REPR: table})
        reps = outcome.upload[ANCHOR_REPR]
        assert reps.shape == (PUBLIC, rank)
        # what is sent is the device's representation of the public set after the round
        after = learner.trainer.represent(learner.encoder.encode(c) for c in eval_batches(public, 8))
        np.testing.assert_allclose(reps, after, rtol=1e-5, atol=1e-6)
        outcomes[steps, bool(table.any())] = (float(np.mean((reps - anchors) ** 2)), outcome)
    plain, pulled, no_anchors = outcomes[0, True], outcomes[6, True], outcomes[6, False]
    # the mean squared distance to the anchors shrinks (measured 0.21 -> 0.03 on this tiny backbone)
    assert pulled[0] < 0.5 * plain[0], (plain[0], pulled[0])
    assert pulled[1].train_loss == pytest.approx(plain[1].train_loss, rel=0.5)  # the own-data loss is still CE
    # a zero (round-0) table means "none yet": exactly the round without anchoring
    for name in names:
        np.testing.assert_array_equal(no_anchors[1].upload[name], plain[1].upload[name], err_msg=name)


def test_a_device_without_the_public_set_says_what_is_missing(
        bundles: dict[str, Bundle], device_data: tuple[list[Sample], list[Sample]]) -> None:
    bundle = bundles["tiny-3"]
    names = tuple(upload_names(bundle.manifest, scopes_for("heterotune"), public_samples=PUBLIC,
                               public_kind="anchor"))
    with pytest.raises(ValueError, match="holds no public data"):
        device_learner(bundle, device_data[0], []).run_round(RoundPlan(1, 2, 8, 5e-3, 0, names, anchor_steps=2), {})


# ------------------------------------------------------------------------------------------ a federation


@pytest.mark.parametrize("method", ["heterotune", "group-fedavg"])
def test_inprocess_rounds_commit_the_weighted_anchors(method: str, bundles: dict[str, Bundle],
                                                      tmp_path: Path) -> None:
    data = fleet_with_public(tmp_path / "data")
    specs = [AgentSpec(a, b, data.client_files[a]) for a, b in PINS.items()]
    run = run_inprocess(_config(method), bundles, specs, data.global_test_file, keep_tensors=True,
                        final_eval=False, public_file=public_file(data))
    assert_rounds_commit_weighted_tables(run, ANCHOR_REPR, method)
    # The public batches draw from their own rng, so round 1's own batches are those of the plain run.
    plain = run_inprocess(_config(method, anchor_steps=0), bundles, specs, data.global_test_file,
                          keep_tensors=True, final_eval=False)
    assert_round_one_is_plain_and_round_two_is_not(run, plain, ANCHOR_REPR)


# ------------------------------------------------------------------------------------------- over MQTT


def test_mqtt_rounds_give_the_inprocess_anchors_and_tensors(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    """heterotune with anchoring over a real mosquitto (three `edge-agent join --public` processes): the
    Assignment carries the anchor steps and weight, the engine checks the (P, r) table, and every committed
    tensor equals the in-process run's."""
    from coordinator.broker import MosquittoBroker

    data = fleet_with_public(tmp_path / "data")
    public = public_file(data)
    with MosquittoBroker(tmp_path / "broker") as broker, \
            agent_processes(tmp_path, data, extra={a: ["--public", str(public)] for a in PINS}) as agents:
        run_federation(_config(), tmp_path / "run", broker=broker.address, start_agents=agents.start)
        codes = agents.wait(60)
    assert all(codes[a] == EXIT_FINISHED for a in PINS), {a: agents.log(a) for a in PINS}
    specs = [AgentSpec(a, b, data.client_files[a]) for a, b in PINS.items()]
    inprocess = run_inprocess(_config(), bundles, specs, data.global_test_file, keep_tensors=True,
                              final_eval=False, public_file=public)
    for round_id in (1, 2):
        mqtt = load_state(tmp_path / "run" / "tensors" / f"round-{round_id:04d}.safetensors")
        expected = inprocess.states[round_id]
        assert sorted(mqtt.global_tensors) == sorted(expected.global_tensors)
        for name, value in expected.global_tensors.items():
            np.testing.assert_allclose(mqtt.global_tensors[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.any(load_state(tmp_path / "run" / "tensors" / "round-0002.safetensors").global_tensors[ANCHOR_REPR])
