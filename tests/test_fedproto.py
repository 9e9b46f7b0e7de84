"""fedproto end to end: the loss term, the device's prototypes, and a federation over MQTT and in process.

FedProto (Tan et al., 2022) as this project defines it (coordinator/aggregation/fedproto.py for the rule):
each device trains its own adapters and head (nothing else leaves it), with loss

    CE(logits, y) + mean_i  lambda[y_i has a global prototype] · mean_r (rep_i - P[y_i])²

where rep is the last DeMA adapter's pooled z (the shared r-space, so a 3- and a 6-block backbone compare) and
P the fleet's count-weighted class means from the previous round; after its local steps it sends its own class
means of rep over its training split and their counts. Tiny random-init backbones: this is about the plumbing
and the arithmetic; whether fedproto learns is the benchmark's question (bench/methods.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from bench.methods_federation import AgentSpec, FederationRun, run_inprocess
from coordinator.aggregation import ClientUpdate, FederatedState
from coordinator.config import RunConfig, TaskConfig
from coordinator.datasets import FleetData
from coordinator.methods import strategy_for, uses_prototypes
from coordinator.runner import build_bundles, run_federation
from coordinator.store import RunStore, load_state
from edge_agent.data import eval_batches, load_examples
from edge_agent.inputs import BatchEncoder
from edge_agent.local_round import LocalLearner, RoundPlan
from edge_agent.prototypes import class_means, prototype_targets, prototype_upload
from edge_agent.trainers.base import Batch
from edge_agent.trainers.ort import OrtTrainer
from edge_agent.trainers.torch_backend import TorchTrainer
from export.bundle import Bundle
from export.dema import training_loss
from protocols.prototypes import prototype_shapes
from tests.harness import agent_processes, fleet_data
from tests.numerics import rel_diff

PINS = {"a1": "tiny-3", "a2": "tiny-6", "a3": "tiny-6"}
LABELS = ("negative", "neutral", "positive")
RANK = 64
PROTO_NAMES = sorted(prototype_shapes(len(LABELS), RANK))


def _config(prototype_weight: float = 1.0, rounds: int = 2) -> RunConfig:
    return RunConfig(run_name="fedproto", method="fedproto", backbones=("tiny-3", "tiny-6"), rounds=rounds,
                     local_steps=3, min_agents=len(PINS), pinned=PINS, task=TaskConfig(max_length=32, batch_size=8),
                     round_timeout_s=120, join_timeout_s=120, learning_rate=5e-3, seed=3,
                     prototype_weight=prototype_weight)


# ------------------------------------------------------------------------------------------ pure arithmetic


def test_training_loss_on_hand_computed_tensors() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    representation = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    prototypes = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    cross_entropy = (math.log(1 + math.exp(-1)) + math.log(2)) / 2  # 0.50320443
    # sample 0: class 0, mean((1-0)², (2-0)²) = 2.5, weight 0.5 -> 1.25; sample 1: mean(0², 2²) = 2, weight 2 -> 4
    no_anchors = (torch.zeros(2, 2), torch.zeros(2))
    loss = training_loss(logits, representation, labels, prototypes, torch.tensor([0.5, 2.0]), *no_anchors)
    assert float(loss) == pytest.approx(cross_entropy + (1.25 + 4.0) / 2, rel=1e-6)
    off = training_loss(logits, representation, labels, prototypes, torch.zeros(2), *no_anchors)
    assert float(off) == pytest.approx(cross_entropy, rel=1e-6)  # zero weights: exactly cross-entropy


def test_class_means_counts_and_upload_names() -> None:
    reps = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [-1.0, 1.0]], np.float32)
    labels = np.array([0, 0, 2, 0])
    means, counts = class_means(reps, labels, num_classes=3)
    np.testing.assert_allclose(means, [[1.0, 7 / 3], [0.0, 0.0], [10.0, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(counts, [3.0, 0.0, 1.0])
    upload = prototype_upload(means, counts)
    assert sorted(upload) == sorted(prototype_shapes(3, 2))
    assert upload["proto_count.1"].shape == () and float(upload["proto_count.1"]) == 0.0
    with pytest.raises(ValueError, match="3 representations for 4 labels"):
        class_means(reps[:3], labels, num_classes=3)


def test_targets_switch_on_only_classes_the_fleet_has_seen() -> None:
    received = {"proto.0": np.array([1.0, 2.0], np.float32), "proto_count.0": np.asarray(5.0, np.float32),
                "proto.1": np.array([9.0, 9.0], np.float32), "proto_count.1": np.asarray(0.0, np.float32)}
    targets, weights = prototype_targets(received, num_classes=3, rank=2, weight=0.5)
    np.testing.assert_array_equal(targets, [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])  # class 1: count 0 = no prototype
    np.testing.assert_array_equal(weights, [0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        prototype_targets({"proto.0": np.zeros(3), "proto_count.0": np.asarray(1.0)}, 3, 2, 1.0)


def test_adapter_rule_and_prototype_rule_side_by_side() -> None:
    # heterotune-noalign (plain sample-weighted mean) on "g", fedproto's count-weighted mean on the prototypes
    strategy = strategy_for(RunConfig(method="heterotune-noalign", share_prototypes=True))
    assert strategy.name == "heterotune-noalign+prototypes"
    state = FederatedState(global_tensors={"g": np.zeros(2, np.float32), "proto.0": np.zeros(2, np.float32),
                                           "proto_count.0": np.asarray(0.0, np.float32)},
                           group_tensors={"s": {"own": np.zeros(1, np.float32)}})
    updates = [ClientUpdate("a", "s", 1, {"g": np.array([1.0, 0.0], np.float32), "own": np.array([2.0], np.float32),
                                          "proto.0": np.array([4.0, 4.0], np.float32),
                                          "proto_count.0": np.asarray(3.0, np.float32)}),
               ClientUpdate("b", "s", 3, {"g": np.array([5.0, 4.0], np.float32), "own": np.array([6.0], np.float32),
                                          "proto.0": np.array([0.0, 8.0], np.float32),
                                          "proto_count.0": np.asarray(1.0, np.float32)})]
    result = strategy.aggregate(state, updates, 1).state
    np.testing.assert_allclose(result.global_tensors["g"], [4.0, 3.0])  # (1*[1,0] + 3*[5,4]) / 4: by samples
    np.testing.assert_allclose(result.group_tensors["s"]["own"], [5.0])  # (1*2 + 3*6) / 4
    np.testing.assert_allclose(result.global_tensors["proto.0"], [3.0, 5.0])  # (3*[4,4] + 1*[0,8]) / 4: by counts
    assert float(result.global_tensors["proto_count.0"]) == 4.0
    assert uses_prototypes(RunConfig(method="fedproto")) and not uses_prototypes(RunConfig(method="heterotune"))
    assert strategy_for(RunConfig(method="fedproto")).name == "fedproto"  # never wrapped twice


# ------------------------------------------------------------------------------- the two trainer backends


@pytest.fixture(scope="module")
def bundles() -> dict[str, Bundle]:
    return build_bundles(_config())


def _perturbed(bundle: Bundle, seed: int = 0) -> dict[str, np.ndarray]:
    """Non-zero W_out (the shipped zero would hide the adapters from the head) and jittered everything else."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in bundle.initial_tensors().items()}


def _batch(bundle: Bundle, data: FleetData) -> Batch:
    examples = load_examples(data.client_files["a1"], LABELS)[:8]
    return BatchEncoder(bundle.directory, bundle.manifest).encode(examples)


def test_both_backends_compute_the_same_prototype_term(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    bundle = bundles["tiny-3"]
    batch = _batch(bundle, fleet_data(tmp_path, ["a1"]))
    start = _perturbed(bundle)
    rng = np.random.default_rng(1)
    prototypes, weights = rng.normal(0, 0.5, (3, RANK)).astype(np.float32), np.array([1.0, 0.5, 2.0], np.float32)
    names = sorted(start)
    results = {}
    for trainer in (OrtTrainer(bundle.directory, threads=1), TorchTrainer(bundle.directory, threads=1)):
        trainer.start_round(start, 1e-3)
        plain = trainer.forward_backward(batch)
        plain_grads = trainer.read_gradients(names)
        trainer.start_round(start, 1e-3)
        trainer.set_prototypes(prototypes, weights)
        pulled = trainer.forward_backward(batch)
        results[trainer.name] = (plain, pulled, plain_grads, trainer.read_gradients(names),
                                 trainer.represent([batch]))
        # an evaluation reports cross-entropy alone: the pull is a training term (same weights, no step taken)
        assert trainer.evaluate([batch]).loss == pytest.approx(plain, rel=1e-5), trainer.name
    ort, pt = results["ort"], results["torch"]
    assert pt[1] > pt[0] + 0.1  # the term is on (and not vacuous): rep is far from random prototypes
    assert abs(ort[0] - pt[0]) <= 1e-5 * pt[0] and abs(ort[1] - pt[1]) <= 1e-5 * pt[1]
    for name in names:
        assert rel_diff(ort[3][name], pt[3][name]) <= 1e-4, name
    # the pull changes the adapters' gradients below the head; the head's are plain cross-entropy's in both
    assert rel_diff(pt[3]["adapters.2.w_in.weight"], pt[2]["adapters.2.w_in.weight"]) > 0.01
    np.testing.assert_allclose(pt[3]["head.weight"], pt[2]["head.weight"], rtol=1e-5, atol=1e-8)
    assert ort[4].shape == (8, RANK) and rel_diff(ort[4], pt[4]) <= 1e-5
    # wrong shapes or values are refused before they reach a graph
    trainer = OrtTrainer(bundle.directory, threads=1)
    trainer.start_round(start, 1e-3)
    with pytest.raises(ValueError, match="do not fit this bundle's 3 classes x r = 64"):
        trainer.set_prototypes(prototypes[:, :8], weights)
    with pytest.raises(ValueError, match="finite"):
        trainer.set_prototypes(np.full_like(prototypes, np.nan), weights)


def test_a_round_uploads_the_class_means_of_its_training_split(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    bundle = bundles["tiny-3"]
    data = fleet_data(tmp_path, ["a1"])
    trainer = OrtTrainer(bundle.directory, threads=1)
    learner = LocalLearner("a1", bundle.directory, bundle.manifest, trainer,
                           load_examples(data.client_files["a1"], LABELS))
    plan = RoundPlan(1, 3, 8, 5e-3, 0, tuple(PROTO_NAMES), prototype_weight=1.0)
    outcome = learner.run_round(plan, {})
    assert sorted(outcome.upload) == PROTO_NAMES  # nothing of the model leaves the device
    # recompute from the trainer as the round left it: every training example, encoded and represented again
    encoder = BatchEncoder(bundle.directory, bundle.manifest)
    reps = trainer.represent(encoder.encode(chunk) for chunk in eval_batches(learner.train, 8))
    labels = np.array([e.label for e in learner.train])
    for index in range(3):
        mine = reps[labels == index]
        assert float(outcome.upload[f"proto_count.{index}"]) == len(mine)
        expected = mine.mean(axis=0) if len(mine) else np.zeros(RANK)
        np.testing.assert_allclose(outcome.upload[f"proto.{index}"], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ a federation, two paths


@pytest.fixture(scope="module")
def federations(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Bundle]
                ) -> tuple[Path, FederationRun, FederationRun]:
    """One fedproto run over MQTT (real mosquitto, three `edge-agent join` processes), the same in process, and
    in process again with lambda = 0."""
    from coordinator.broker import MosquittoBroker

    tmp = tmp_path_factory.mktemp("fedproto")
    data = fleet_data(tmp, list(PINS))
    with MosquittoBroker(tmp / "broker") as broker, agent_processes(tmp, data) as agents:
        run_federation(_config(), tmp / "run", broker=broker.address, start_agents=agents.start)
        codes = agents.wait(60)
    assert all(c == 0 for c in codes.values()), {a: agents.log(a) for a in PINS}
    specs = [AgentSpec(a, b, data.client_files[a]) for a, b in PINS.items()]
    pulled = run_inprocess(_config(), bundles, specs, data.global_test_file, keep_tensors=True, final_eval=False)
    free = run_inprocess(_config(prototype_weight=0.0), bundles, specs, data.global_test_file, keep_tensors=True,
                         final_eval=False)
    return tmp / "run", pulled, free


def _reference_prototypes(updates: dict[str, dict[str, np.ndarray]], before: dict[str, np.ndarray]
                          ) -> dict[str, np.ndarray]:
    """The rule, by hand: per class, the count-weighted mean over agents that saw it; unseen classes keep theirs."""
    out: dict[str, np.ndarray] = {}
    for index in range(len(LABELS)):
        proto, count = f"proto.{index}", f"proto_count.{index}"
        seen = [(u[proto].astype(np.float64), float(u[count])) for u in updates.values() if float(u[count]) > 0]
        total = sum(m for _, m in seen)
        out[proto] = np.sum([m * p for p, m in seen], axis=0) / total if seen else before[proto]
        out[count] = np.asarray(total) if seen else before[count]
    return out


def test_mqtt_rounds_commit_the_count_weighted_class_means(
        federations: tuple[Path, FederationRun, FederationRun]) -> None:
    run_dir, _, _ = federations
    for round_id in (1, 2):
        before = load_state(run_dir / "tensors" / f"round-{round_id - 1:04d}.safetensors")
        after = load_state(run_dir / "tensors" / f"round-{round_id:04d}.safetensors")
        updates = {a: load_file(str(run_dir / "updates" / f"round-{round_id:04d}" / f"{a}.safetensors"))
                   for a in PINS}
        assert all(sorted(u) == PROTO_NAMES for u in updates.values())
        assert sorted(after.global_tensors) == PROTO_NAMES
        assert after.global_tensors["proto_count.0"].shape == () == updates["a1"]["proto_count.0"].shape  # stored 0-d
        assert after.group_tensors == {"tiny-3": {}, "tiny-6": {}}  # no adapter tensor is shared
        for name, value in _reference_prototypes(updates, before.global_tensors).items():
            np.testing.assert_allclose(after.global_tensors[name], value, rtol=1e-5, atol=1e-7)
        counts = sum(float(after.global_tensors[f"proto_count.{i}"]) for i in range(len(LABELS)))
        n_train = sum(r.n_train for r in RunStore(run_dir).metrics() if r.round == round_id)
        assert counts == n_train  # every training sample of every agent is behind exactly one class prototype
    start = load_state(run_dir / "tensors" / "round-0000.safetensors")
    assert all(not np.any(v) for v in start.global_tensors.values())  # no prototype before round 1


def test_inprocess_path_gives_the_mqtt_tensors(federations: tuple[Path, FederationRun, FederationRun]) -> None:
    run_dir, pulled, _ = federations
    for round_id in (1, 2):
        mqtt = load_state(run_dir / "tensors" / f"round-{round_id:04d}.safetensors")
        for name, value in pulled.states[round_id].global_tensors.items():
            np.testing.assert_allclose(mqtt.global_tensors[name], value, rtol=1e-5, atol=1e-6)


def test_the_pull_changes_training_only_once_prototypes_exist(
        federations: tuple[Path, FederationRun, FederationRun]) -> None:
    _, pulled, free = federations
    # round 1 starts with no prototype: lambda makes no difference yet
    for agent in PINS:
        for name in PROTO_NAMES:
            np.testing.assert_array_equal(pulled.updates[1][agent][name], free.updates[1][agent][name])
    # round 2 trains towards round 1's prototypes: representations move (counts, a property of the data, do not)
    moved = max(rel_diff(pulled.updates[2][a][f"proto.{i}"], free.updates[2][a][f"proto.{i}"])
                for a in PINS for i in range(len(LABELS)) if float(free.updates[2][a][f"proto_count.{i}"]) > 0)
    assert moved > 1e-3
    for agent in PINS:
        for index in range(len(LABELS)):
            name = f"proto_count.{index}"
            assert float(pulled.updates[2][agent][name]) == float(free.updates[2][agent][name])
