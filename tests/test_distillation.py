"""Consensus distillation (issue 3's "distillation on public unlabelled data"): the rule, the device, a federation.

As this project defines it: every device of a run holds the same public set of P unlabelled samples. After its
local steps a device sends ``distill.probs``, its class probabilities on that set (P x classes). The coordinator
sends back the n_k-weighted mean of those tables (fleet-wide for heterotune, per backbone group for group-fedavg),
and next round the device interleaves one step on the consensus's arg-max labels per local step. Tiny random-init
backbones: this is about the plumbing and the arithmetic; whether it helps is the benchmark's question.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from pydantic import ValidationError

from bench.methods_federation import AgentSpec, FederationRun, run_inprocess
from coordinator.aggregation import ClientUpdate, FederatedState
from coordinator.config import RunConfig
from coordinator.federation_state import initial_state, payload_bytes, upload_names
from coordinator.methods import distillation_scope, scopes_for, strategy_for
from coordinator.runner import build_bundles, run_federation
from coordinator.store import load_state
from edge_agent.agent import EXIT_FINISHED, EXIT_REFUSED
from edge_agent.data import Sample, eval_batches, load_examples
from edge_agent.distillation import confident_rows, pseudo_labels, softmax, step_order, to_local_prior
from edge_agent.local_round import RoundPlan
from export.bundle import Bundle
from protocols.distillation import DISTILL_PROBS
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


def _config(method: str = "heterotune", distill_steps: int = 3) -> RunConfig:
    return public_config("distill", method, distill_steps=distill_steps)


# ------------------------------------------------------------------------------------------ pure arithmetic


def test_distillation_steps_are_spread_among_the_own_steps_and_the_last_is_own() -> None:
    def shown(own: int, distill: int) -> str:
        return "".join("D" if d else "o" for d in step_order(own, distill))

    assert shown(8, 4) == "oDooDooDooDo"
    assert shown(3, 3) == "DoDoDo"
    assert shown(1, 3) == "DDDo"
    assert shown(4, 0) == "oooo"
    with pytest.raises(ValueError, match="at least one own step"):
        step_order(0, 3)


def test_pseudo_labels_read_the_consensus_and_refuse_what_is_not_one() -> None:
    np.testing.assert_allclose(softmax(np.array([[0.0, np.log(3.0)], [1000.0, 0.0]])), [[0.25, 0.75], [1.0, 0.0]],
                               atol=1e-7)  # stable at large logits
    table = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]], np.float32)
    np.testing.assert_array_equal(pseudo_labels(table, 2, 3), [1, 0])
    assert pseudo_labels(np.zeros((2, 3), np.float32), 2, 3) is None  # round 0: no consensus yet
    with pytest.raises(ValueError, match=r"needs \(3, 3\)"):
        pseudo_labels(table, 3, 3)
    with pytest.raises(ValueError, match="not a table of class probabilities"):
        pseudo_labels(np.array([[np.nan, 0.5, 0.5], [1.0, 0.0, 0.0]]), 2, 3)
    with pytest.raises(ValueError, match="not a table of class probabilities"):
        pseudo_labels(np.array([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]]), 2, 3)


def test_the_local_prior_swaps_the_fleet_label_mix_for_the_device_one() -> None:
    consensus = np.array([[0.5, 0.5], [0.8, 0.2]], np.float32)
    # counts [3, 1] -> pi_local (add-one) [4/6, 2/6]; pi_fleet = the consensus's mean row [0.65, 0.35]
    weights = np.array([(4 / 6) / 0.65, (2 / 6) / 0.35])
    expected = consensus * weights / (consensus * weights).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(to_local_prior(consensus, np.array([3, 1])), expected, rtol=1e-6)
    # a device whose mix is the fleet's ([13, 7] / 20 after add-one) gets the consensus back
    np.testing.assert_allclose(to_local_prior(consensus, np.array([12, 6])), consensus, rtol=1e-6)
    # a class the device never saw stays possible, just less likely
    assert 0 < to_local_prior(consensus, np.array([5, 0]))[1, 1] < 0.2


def test_confident_rows_keep_the_samples_the_consensus_is_surest_of() -> None:
    consensus = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]], np.float32)  # top 0.9, 0.6, 0.7, 0.5
    np.testing.assert_array_equal(confident_rows(consensus, 0.5), [0, 2])
    np.testing.assert_array_equal(confident_rows(consensus, 0.01), [0])  # at least one row
    np.testing.assert_array_equal(confident_rows(consensus, 1.0), [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        confident_rows(consensus, 0.0)


def _update(agent: str, group: str, n: int, **tensors: list[Any]) -> ClientUpdate:
    return ClientUpdate(agent, group, n, {k.replace("probs", DISTILL_PROBS): np.array(v, np.float32)
                                          for k, v in tensors.items()})


def test_fleet_wide_consensus_on_hand_computed_tensors() -> None:
    strategy = strategy_for(RunConfig(method="heterotune-noalign", distill_steps=1, public_samples=2))
    assert strategy.name == "heterotune-noalign+distillation"
    state = FederatedState({"g": np.zeros(2, np.float32), DISTILL_PROBS: np.zeros((2, 2), np.float32)},
                           {"s": {}, "l": {}})
    updates = [_update("a", "s", 1, g=[1.0, 0.0], probs=[[1.0, 0.0], [0.5, 0.5]]),
               _update("b", "l", 3, g=[5.0, 4.0], probs=[[0.0, 1.0], [0.1, 0.9]])]
    result = strategy.aggregate(state, updates, 1)
    np.testing.assert_allclose(result.state.global_tensors["g"], [4.0, 3.0])  # the inner rule, untouched
    # (1 * a + 3 * b) / 4, across the two backbone groups
    np.testing.assert_allclose(result.state.global_tensors[DISTILL_PROBS], [[0.25, 0.75], [0.2, 0.8]], rtol=1e-6)
    assert result.diagnostics["distillation"] == {"scope": "global"}


def test_group_consensus_stays_within_each_backbone_group() -> None:
    config = RunConfig(method="group-fedavg", distill_steps=1, public_samples=1)
    assert distillation_scope(config) == "group"
    state = FederatedState({}, {g: {"w": np.zeros(1, np.float32), DISTILL_PROBS: np.zeros((1, 2), np.float32)}
                                for g in ("s", "l", "idle")})
    state.group_tensors["idle"][DISTILL_PROBS] = np.array([[0.3, 0.7]], np.float32)
    updates = [_update("a", "s", 1, w=[2.0], probs=[[1.0, 0.0]]), _update("b", "s", 1, w=[4.0], probs=[[0.0, 1.0]]),
               _update("c", "l", 2, w=[8.0], probs=[[0.2, 0.8]])]
    result = strategy_for(config).aggregate(state, updates, 1).state
    np.testing.assert_allclose(result.group_tensors["s"][DISTILL_PROBS], [[0.5, 0.5]])
    np.testing.assert_allclose(result.group_tensors["l"][DISTILL_PROBS], [[0.2, 0.8]])  # b's table never reaches l
    np.testing.assert_allclose(result.group_tensors["idle"][DISTILL_PROBS], [[0.3, 0.7]])  # no update: kept
    np.testing.assert_allclose(result.group_tensors["s"]["w"], [3.0])


def test_a_table_that_is_not_probabilities_is_refused_with_the_agent_named() -> None:
    strategy = strategy_for(RunConfig(method="heterotune-noalign", distill_steps=1, public_samples=1))
    state = FederatedState({DISTILL_PROBS: np.zeros((1, 2), np.float32)}, {"s": {}})
    good = _update("a", "s", 1, probs=[[0.5, 0.5]])
    for bad, why in ((_update("nan-agent", "s", 1, probs=[[np.nan, 1.0]]), "non-finite value"),
                     (_update("nan-agent", "s", 1, probs=[[0.7, 0.7]]), "not a table of class probabilities"),
                     (_update("nan-agent", "s", 1, probs=[[0.5, 0.5], [0.5, 0.5]]), r"expected \(1, 2\)")):
        with pytest.raises(ValueError, match=f"nan-agent.*{why}"):
            strategy.aggregate(state, [good, bad], 1)


def test_a_run_that_distils_needs_a_public_set_and_a_sharing_method() -> None:
    with pytest.raises(ValidationError, match="distill_steps needs a public set"):
        RunConfig(distill_steps=2)
    with pytest.raises(ValueError, match="shares no experts"):
        distillation_scope(RunConfig(method="local", distill_steps=2, public_samples=4))
    assert distillation_scope(RunConfig(method="heterotune", distill_steps=2, public_samples=4)) == "global"
    assert distillation_scope(RunConfig(method="heterotune")) is None


# --------------------------------------------------------------------------------- state, names and data


@pytest.fixture(scope="module")
def bundles() -> dict[str, Bundle]:
    return build_bundles(_config())


def test_state_and_uploads_carry_one_probability_table(bundles: dict[str, Bundle]) -> None:
    manifest = bundles["tiny-3"].manifest
    scopes = scopes_for("heterotune")
    plain = upload_names(manifest, scopes)
    names = upload_names(manifest, scopes, public_samples=PUBLIC)
    assert sorted(set(names) - set(plain)) == [DISTILL_PROBS]
    assert payload_bytes(manifest, names, public_samples=PUBLIC) - payload_bytes(manifest, plain) == 4 * PUBLIC * 3
    fleet = initial_state(bundles, scopes, public_samples=PUBLIC)
    np.testing.assert_array_equal(fleet.global_tensors[DISTILL_PROBS], np.zeros((PUBLIC, 3)))
    grouped = initial_state(bundles, scopes_for("group-fedavg"), public_samples=PUBLIC, public_scope="group")
    assert DISTILL_PROBS not in grouped.global_tensors
    assert all(t[DISTILL_PROBS].shape == (PUBLIC, 3) for t in grouped.group_tensors.values())
    with pytest.raises(ValueError, match="a shared scope"):
        initial_state(bundles, scopes, public_samples=PUBLIC, public_scope="local")


def test_the_public_set_is_held_out_from_every_agent_and_the_global_test(tmp_path: Path) -> None:
    data = fleet_with_public(tmp_path / "data")
    public = {e.text for e in cast(list[Any], load_examples(public_file(data), LABELS))}
    assert len(public) == PUBLIC
    for path in [*data.client_files.values(), data.global_test_file]:
        held = {e.text for e in cast(list[Any], load_examples(path, LABELS))}
        assert not held & public, path.name


# ------------------------------------------------------------------------------------------- the device


@pytest.fixture(scope="module")
def device_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Sample], list[Sample]]:
    data = fleet_with_public(tmp_path_factory.mktemp("device") / "data")
    return load_examples(data.client_files["a1"], LABELS), load_examples(public_file(data), LABELS)


def test_the_device_sends_its_probabilities_and_never_reads_public_labels(
        bundles: dict[str, Bundle], device_data: tuple[list[Sample], list[Sample]]) -> None:
    bundle = bundles["tiny-3"]
    examples, public = device_data
    names = tuple(upload_names(bundle.manifest, scopes_for("heterotune"), public_samples=PUBLIC))
    consensus = np.tile(np.array([[0.1, 0.2, 0.7]], np.float32), (PUBLIC, 1))
    plan = RoundPlan(1, 3, 8, 5e-3, 0, names, distill_steps=3)
    learner = device_learner(bundle, examples, public)
    outcome = learner.run_round(plan, {DISTILL_PROBS: consensus})
    probs = outcome.upload[DISTILL_PROBS]
    assert probs.shape == (PUBLIC, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    logits = learner.trainer.predict(learner.encoder.encode(c) for c in eval_batches(public, 8))
    np.testing.assert_allclose(probs, softmax(logits), rtol=1e-5)  # after the round, on the public set
    # The same round with the public file's labels shuffled: the very same upload (only the consensus labels)
    relabelled = [dataclasses.replace(s, label=(s.label + 1) % 3) for s in public]
    again = device_learner(bundle, examples, relabelled).run_round(plan, {DISTILL_PROBS: consensus})
    for name in names:
        np.testing.assert_array_equal(again.upload[name], outcome.upload[name], err_msg=name)


def test_distillation_steps_pull_the_device_towards_the_consensus_and_none_without_one(
        bundles: dict[str, Bundle], device_data: tuple[list[Sample], list[Sample]]) -> None:
    bundle = bundles["tiny-3"]
    examples, public = device_data
    names = tuple(upload_names(bundle.manifest, scopes_for("heterotune"), public_samples=PUBLIC))
    everything_neutral = np.tile(np.array([[0.0, 1.0, 0.0]], np.float32), (PUBLIC, 1))
    shares = {}
    for steps, consensus in ((0, everything_neutral), (6, everything_neutral), (6, np.zeros_like(everything_neutral))):
        learner = device_learner(bundle, examples, public)
        outcome = learner.run_round(RoundPlan(1, 6, 8, 5e-3, 0, names, distill_steps=steps),
                                    {DISTILL_PROBS: consensus})
        shares[steps, bool(consensus.any())] = (float(np.mean(outcome.upload[DISTILL_PROBS][:, 1])), outcome)
    plain, pulled, no_consensus = shares[0, True], shares[6, True], shares[6, False]
    assert pulled[0] > plain[0] + 0.1, (plain[0], pulled[0])  # mean P(neutral) on the public set rises
    # a zero (round-0) consensus means "none yet": exactly the round without distillation
    for name in names:
        np.testing.assert_array_equal(no_consensus[1].upload[name], plain[1].upload[name], err_msg=name)


def test_a_device_without_the_public_set_says_what_is_missing(
        bundles: dict[str, Bundle], device_data: tuple[list[Sample], list[Sample]]) -> None:
    bundle = bundles["tiny-3"]
    names = tuple(upload_names(bundle.manifest, scopes_for("heterotune"), public_samples=PUBLIC))
    with pytest.raises(ValueError, match="holds no public data"):
        device_learner(bundle, device_data[0], []).run_round(RoundPlan(1, 2, 8, 5e-3, 0, names, distill_steps=2), {})


# ------------------------------------------------------------------------------------------ a federation


@pytest.mark.parametrize("method", ["heterotune", "group-fedavg"])
def test_inprocess_rounds_commit_the_weighted_consensus(method: str, bundles: dict[str, Bundle],
                                                        tmp_path: Path) -> None:
    data = fleet_with_public(tmp_path / "data")
    specs = [AgentSpec(a, b, data.client_files[a]) for a, b in PINS.items()]
    run = run_inprocess(_config(method), bundles, specs, data.global_test_file, keep_tensors=True,
                        final_eval=False, public_file=public_file(data))
    assert_rounds_commit_weighted_tables(run, DISTILL_PROBS, method)
    plain = run_inprocess(_config(method, distill_steps=0), bundles, specs, data.global_test_file, keep_tensors=True,
                          final_eval=False)
    assert_round_one_is_plain_and_round_two_is_not(run, plain, DISTILL_PROBS)


# ------------------------------------------------------------------------------------------- over MQTT


@pytest.fixture(scope="module")
def mqtt_and_inprocess(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Bundle]
                       ) -> tuple[Path, FederationRun, dict[str, int | None], str]:
    """heterotune with distillation over a real mosquitto (three `edge-agent join --public` processes and one
    device without the public set), and the same three agents in process."""
    from coordinator.broker import MosquittoBroker

    tmp = tmp_path_factory.mktemp("distill-mqtt")
    data = fleet_with_public(tmp / "data", [*PINS, "no-public"], max_samples=800)
    public = public_file(data)
    extra = {a: ["--public", str(public)] for a in PINS}
    with MosquittoBroker(tmp / "broker") as broker, agent_processes(tmp, data, extra=extra) as agents:
        run_federation(_config(), tmp / "run", broker=broker.address, start_agents=agents.start)
        codes = agents.wait(60)
        refusal = agents.log("no-public")
    assert all(codes[a] == EXIT_FINISHED for a in PINS), {a: agents.log(a) for a in PINS}
    specs = [AgentSpec(a, b, data.client_files[a]) for a, b in PINS.items()]
    inprocess = run_inprocess(_config(), bundles, specs, data.global_test_file, keep_tensors=True, final_eval=False,
                              public_file=public)
    return tmp / "run", inprocess, codes, refusal


def test_mqtt_rounds_give_the_inprocess_consensus_and_tensors(
        mqtt_and_inprocess: tuple[Path, FederationRun, dict[str, int | None], str]) -> None:
    run_dir, inprocess, _, _ = mqtt_and_inprocess
    for round_id in (1, 2):
        mqtt = load_state(run_dir / "tensors" / f"round-{round_id:04d}.safetensors")
        expected = inprocess.states[round_id]
        assert sorted(mqtt.global_tensors) == sorted(expected.global_tensors)
        assert mqtt.global_tensors[DISTILL_PROBS].shape == (PUBLIC, 3)
        for name, value in expected.global_tensors.items():
            np.testing.assert_allclose(mqtt.global_tensors[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.any(load_state(run_dir / "tensors" / "round-0002.safetensors").global_tensors[DISTILL_PROBS])


def test_a_device_without_the_run_public_set_is_refused_with_the_fix(
        mqtt_and_inprocess: tuple[Path, FederationRun, dict[str, int | None], str]) -> None:
    _, _, codes, log = mqtt_and_inprocess
    assert codes["no-public"] == EXIT_REFUSED
    assert f"public set of {PUBLIC} samples and the device holds 0" in log and "--public" in log
