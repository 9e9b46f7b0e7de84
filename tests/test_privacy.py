"""Client-level differential privacy: clipping, the noise scale, the accountant, the budget gate, a private run.

Why each matters: a wrong clip or a noise std off by a factor (per device instead of per sum, C instead of z C)
silently voids the guarantee the accountant reports; an accountant that disagrees with dp-accounting, or a run
that starts (or resumes) past its budget, reports a privacy the run does not have.
"""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from bench.methods_federation import AgentSpec, run_inprocess
from coordinator.aggregation import ClientUpdate, FederatedState, GroupFedAvg, HeteroTune, HeteroTuneNoAlign
from coordinator.aggregation.dp import DifferentiallyPrivate, admit
from coordinator.aggregation.streaming import GroupAccumulator
from coordinator.broker import MosquittoBroker
from coordinator.config import ConfigError, RunConfig, TaskConfig, parse_config, privacy_plan
from coordinator.methods import strategy_for
from coordinator.privacy import (
    RDP_ORDERS,
    PrivacyBudgetError,
    RoundSpend,
    calibrate_noise,
    check_resumed_privacy,
    clip_delta,
    epsilon,
    plan,
)
from coordinator.runner import build_bundles, run_federation
from coordinator.store import RunStore
from tests.harness import agent_processes, fleet_data

DELTA = 1e-5


def _plan(clip: float, z: float, per_round: int, rounds: int = 10) -> object:
    return plan(clip_norm=clip, target_epsilon=1e6, delta=DELTA, population=per_round, per_round=per_round,
                rounds=rounds, noise_multiplier=z)


# --- clipping ---------------------------------------------------------------------------------------------------


def test_clip_scales_the_joint_vector_to_the_norm() -> None:
    # |(3, 0, 4)| = 5: clipped to 1 jointly -> (0.6, 0, 0.8); each tensor alone would have stayed (3, 0) and (4).
    clipped, norm = clip_delta({"a": np.array([3.0, 0.0]), "b": np.array([4.0])}, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0])
    np.testing.assert_allclose(clipped["b"], [0.8])
    small, norm = clip_delta({"a": np.array([0.3, 0.4])}, 1.0)  # |.| = 0.5 <= C: untouched
    assert norm == pytest.approx(0.5)
    np.testing.assert_array_equal(small["a"], [0.3, 0.4])


def test_clip_is_relative_to_the_state_and_gives_every_device_weight_one() -> None:
    state = FederatedState({"w": np.array([1.0, 1.0], np.float32)}, {"g": {"h": np.array([2.0], np.float32)}})
    strategy = DifferentiallyPrivate(HeteroTune(), _plan(1.0, 1.0, 4), noise_seed=0)  # type: ignore[arg-type]
    update = ClientUpdate("a", "g", 500, {"w": np.array([4.0, 1.0], np.float32), "h": np.array([6.0], np.float32)})
    clipped = admit(strategy, state, update)
    # delta (3, 0 | 4), norm 5 -> (0.6, 0 | 0.8) around the state
    np.testing.assert_allclose(clipped.tensors["w"], [1.6, 1.0])
    np.testing.assert_allclose(clipped.tensors["h"], [2.8])
    assert clipped.num_samples == 1
    assert admit(HeteroTune(), state, update) is update  # a run without DP is untouched


def test_an_unclipped_update_is_refused() -> None:
    state = FederatedState({"w": np.zeros(2, np.float32)}, {"g": {}})
    strategy = DifferentiallyPrivate(HeteroTune(), _plan(1.0, 1.0, 4), noise_seed=0)  # type: ignore[arg-type]
    raw = ClientUpdate("a", "g", 1, {"w": np.array([3.0, 4.0], np.float32)})
    with pytest.raises(ValueError, match="not clipped"):
        strategy.aggregate(state, [raw], 1)


# --- the noise scale --------------------------------------------------------------------------------------------

SIZE = 40_000  # coordinates per tensor: the sample for the std estimate


def _fleet(state: FederatedState, rng: np.random.Generator, groups: dict[str, int]) -> list[ClientUpdate]:
    updates = []
    for group, count in groups.items():
        for i in range(count):
            tensors = {n: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
                       for n, v in {**state.global_tensors, **state.group_tensors[group]}.items()}
            updates.append(ClientUpdate(f"{group}-{i}", group, 10 + i, tensors))
    return updates


def _assert_std(residual: np.ndarray, expected: float) -> None:
    """Sample std within 5 standard errors (SE of a normal sample's std is about std / sqrt(2n)); mean near 0."""
    n = residual.size
    assert abs(float(np.std(residual)) - expected) <= 5 * expected / math.sqrt(2 * n)
    assert abs(float(np.mean(residual))) <= 5 * expected / math.sqrt(n)


def test_noise_on_each_groups_mean_has_std_z_c_over_its_devices() -> None:
    """group-fedavg keeps each group's noisy mean: aggregate - clipped mean ~ N(0, (z C / m_g)^2) per coordinate."""
    z, clip = 1.5, 0.5
    state = FederatedState({}, {"a": {"h": np.zeros(SIZE, np.float32)}, "b": {"h": np.ones(SIZE, np.float32)}})
    fleet = _fleet(state, np.random.default_rng(0), {"a": 1, "b": 3})
    strategy = DifferentiallyPrivate(GroupFedAvg(), _plan(clip, z, 4), noise_seed=11)  # type: ignore[arg-type]
    clipped = [admit(strategy, state, u) for u in fleet]
    for u in clipped:  # each device's delta (norm ~ 0.05 sqrt(SIZE) = 10) was clipped to 0.5
        delta = u.tensors["h"] - state.group_tensors[u.group]["h"]
        assert float(np.linalg.norm(delta)) == pytest.approx(clip, rel=1e-9)
    result = strategy.aggregate(state, clipped, round_id=1)
    for group, count in (("a", 1), ("b", 3)):
        members = [u.tensors["h"] for u in clipped if u.group == group]
        clipped_mean = np.mean(members, axis=0)
        _assert_std(result.state.group_tensors[group]["h"].astype(np.float64) - clipped_mean, z * clip / count)
    privacy = result.diagnostics["privacy"]
    assert privacy["devices"] == 4 and privacy["noise_multiplier"] == z
    assert privacy["epsilon"] == pytest.approx(epsilon(z, 1, DELTA, 4, 4))


def test_global_tensors_get_noise_per_group_and_cmga_combines_them() -> None:
    """heterotune on one group with eta_s = 1 is the noisy mean. On two groups the rule sees one noisy mean per
    group: heterotune-noalign (CMGA without the projection, which would fire on noise-dominated vectors at random)
    with weights m_b / M steps by sum_b (m_b / M) noisy_mean_b, noise std z C sqrt(G) / M."""
    z, clip = 2.0, 0.25
    theta = np.zeros(SIZE, np.float32)
    one = FederatedState({"w": theta}, {"a": {}})
    fleet = _fleet(one, np.random.default_rng(1), {"a": 2})
    strategy = DifferentiallyPrivate(HeteroTune(), _plan(clip, z, 4), noise_seed=3)  # type: ignore[arg-type]
    clipped = [admit(strategy, one, u) for u in fleet]
    result = strategy.aggregate(one, clipped, round_id=2)
    _assert_std(result.state.global_tensors["w"] - np.mean([u.tensors["w"] for u in clipped], axis=0), z * clip / 2)

    two = FederatedState({"w": theta}, {"a": {}, "b": {}})
    # Every device moves the same direction by a norm above C.
    same = [ClientUpdate(f"d{i}", g, 1, {"w": np.full(SIZE, 0.01, np.float32)})
            for i, g in enumerate(["a", "a", "b", "b"])]
    noalign = DifferentiallyPrivate(HeteroTuneNoAlign(), strategy.plan, noise_seed=3)
    clipped = [admit(noalign, two, u) for u in same]
    result = noalign.aggregate(two, clipped, round_id=3)
    _assert_std(result.state.global_tensors["w"] - clipped[0].tensors["w"], z * clip * math.sqrt(2) / 4)


def test_the_engines_group_sums_give_the_same_aggregate_as_single_updates() -> None:
    """The engine streams updates into per-group means (GroupAccumulator); the noisy aggregate must equal the one
    computed from the individual clipped updates with the same noise seed (up to the means' float32 rounding)."""
    state = FederatedState({"w": np.zeros(500, np.float32)},
                           {"a": {"h": np.zeros(300, np.float32)}, "b": {"h": np.zeros(300, np.float32)}})
    fleet = _fleet(state, np.random.default_rng(2), {"a": 2, "b": 3})
    strategy = DifferentiallyPrivate(HeteroTune(), _plan(0.3, 1.0, 5), noise_seed=5)  # type: ignore[arg-type]
    clipped = [admit(strategy, state, u) for u in fleet]
    accumulator = GroupAccumulator()
    for u in clipped:
        accumulator.add(u)
    direct = strategy.aggregate(state, clipped, 1).state
    streamed = strategy.aggregate(state, accumulator.as_updates(), 1).state
    np.testing.assert_allclose(streamed.global_tensors["w"], direct.global_tensors["w"], atol=1e-6)
    for g in ("a", "b"):
        np.testing.assert_allclose(streamed.group_tensors[g]["h"], direct.group_tensors[g]["h"], atol=1e-6)
    other_seed = DifferentiallyPrivate(HeteroTune(), strategy.plan, noise_seed=6).aggregate(state, clipped, 1).state
    assert not np.allclose(other_seed.global_tensors["w"], direct.global_tensors["w"])


def test_more_devices_than_accounted_are_refused() -> None:
    state = FederatedState({"w": np.zeros(3, np.float32)}, {"a": {}})
    strategy = DifferentiallyPrivate(HeteroTune(), _plan(1.0, 1.0, 2), noise_seed=0)  # type: ignore[arg-type]
    updates = [ClientUpdate(f"d{i}", "a", 1, {"w": np.zeros(3, np.float32)}) for i in range(3)]
    with pytest.raises(ValueError, match="at most 2 a round"):
        strategy.aggregate(state, updates, 1)


# --- the accountant ---------------------------------------------------------------------------------------------


def test_epsilon_is_dp_accountings_for_both_samplings() -> None:
    z, population, per_round, rounds = 1.3, 1000, 50, 40
    fixed = RdpAccountant(list(RDP_ORDERS), dpa.NeighboringRelation.REPLACE_ONE)
    fixed.compose(dpa.SelfComposedDpEvent(
        dpa.SampledWithoutReplacementDpEvent(population, per_round, dpa.GaussianDpEvent(z / 2)), rounds))
    assert epsilon(z, rounds, DELTA, population, per_round) == pytest.approx(fixed.get_epsilon(DELTA), rel=1e-12)
    poisson = RdpAccountant(list(RDP_ORDERS))
    poisson.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(per_round / population,
                                                                      dpa.GaussianDpEvent(z)), rounds))
    assert epsilon(z, rounds, DELTA, population, per_round, "poisson") == pytest.approx(
        poisson.get_epsilon(DELTA), rel=1e-12)


def test_epsilon_is_monotone() -> None:
    by_z = [epsilon(z, 20, DELTA, 100, 10) for z in (0.8, 1.0, 2.0, 4.0)]
    by_rounds = [epsilon(1.0, t, DELTA, 100, 10) for t in (1, 5, 20, 80)]
    by_rate = [epsilon(1.0, 20, DELTA, 100, m) for m in (5, 10, 50, 100)]
    by_delta = [epsilon(1.0, 20, d, 100, 10) for d in (1e-3, 1e-5, 1e-7)]
    assert by_z == sorted(by_z, reverse=True) and len(set(by_z)) == 4
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    assert by_rate == sorted(by_rate) and len(set(by_rate)) == 4
    assert by_delta == sorted(by_delta) and len(set(by_delta)) == 3


def test_calibrated_noise_spends_the_budget_and_no_more() -> None:
    for target in (1.0, 4.0, 8.0):
        z = calibrate_noise(target, 3, DELTA, 4, 4)
        assert epsilon(z, 3, DELTA, 4, 4) <= target
        assert epsilon(z * 0.999, 3, DELTA, 4, 4) > target  # not wastefully high
    # The orders left out of dp-accounting's defaults (33-63, 128-1024) do not matter at these budgets.
    z = calibrate_noise(4.0, 20, DELTA, 100, 10)
    full = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    full.compose(dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(z / 2)), 20))
    assert full.get_epsilon(DELTA) == pytest.approx(4.0, rel=1e-3)


# --- the budget gate --------------------------------------------------------------------------------------------


def _raw(**privacy: object) -> dict[str, object]:
    return {"rounds": 20, "agents_per_round": 10,
            "privacy": {"clip_norm": 0.5, "target_epsilon": 2.0, "population": 100, **privacy}}


def test_a_config_whose_budget_is_exhausted_is_refused_naming_the_fields() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_raw(noise_multiplier=0.5))
    message = str(caught.value)
    for field in ("privacy budget exhausted", "rounds = 20", "privacy.noise_multiplier = 0.5",
                  "privacy.population = 100", "privacy.delta", "privacy.target_epsilon = 2"):
        assert field in message
    # ... and the z it suggests does fit
    suggested = float(message.split("privacy.noise_multiplier to >= ")[1].split(",")[0])
    assert parse_config(_raw(noise_multiplier=suggested)).privacy is not None
    config = parse_config(_raw())  # no z: calibrated to the budget
    calibrated = privacy_plan(config)
    assert calibrated is not None and calibrated.planned_epsilon == pytest.approx(2.0, rel=1e-3)
    assert calibrated.planned_epsilon <= 2.0


def test_privacy_refuses_methods_whose_tables_would_travel_without_noise() -> None:
    with pytest.raises(ConfigError, match="privacy clips and noises model updates only"):
        parse_config({**_raw(), "method": "fedproto"})
    with pytest.raises(ConfigError, match="population"):
        parse_config({**_raw(), "agents_per_round": 200})


def test_resume_counts_what_was_spent(tmp_path: Path) -> None:
    config = parse_config(_raw(noise_multiplier=5.0))
    run_plan = privacy_plan(config)
    assert run_plan is not None
    store = RunStore(tmp_path / "run")
    state = FederatedState({"w": np.zeros(2, np.float32)}, {"g": {}})
    spend = RoundSpend(5.0, 100, 10).as_dict()
    for r in range(1, 11):
        store.commit_round(r, state, started=0.0, selected=10, metrics=[], diagnostics={"privacy": spend})
    total = check_resumed_privacy(run_plan, store.round_diagnostics())
    assert total == pytest.approx(run_plan.planned_epsilon)  # 10 spent + 10 to go = the plan
    # Resumed with twice the rounds and z left to calibration: the config alone passes (40 rounds at a larger z fit
    # the budget), but the 10 rounds already spent at z = 5 count, and with them the run would overspend.
    longer = parse_config({**_raw(), "rounds": 40})
    longer_plan = privacy_plan(longer)
    assert longer_plan is not None and longer_plan.noise_multiplier > 5.0
    with pytest.raises(PrivacyBudgetError, match="committed rounds spent epsilon"):
        check_resumed_privacy(longer_plan, store.round_diagnostics())
    # A round committed without DP released an unnoised aggregate: no budget covers it.
    store.commit_round(11, state, started=0.0, selected=10, metrics=[], diagnostics={})
    with pytest.raises(PrivacyBudgetError):
        check_resumed_privacy(run_plan, store.round_diagnostics())
    assert check_resumed_privacy(None, store.round_diagnostics()) is None
    store.close()


# --- a private run ----------------------------------------------------------------------------------------------

PINS = {"a1": "tiny-3", "a2": "tiny-6", "a3": "tiny-6"}


def test_a_private_run_completes_in_process(tmp_path: Path) -> None:
    data = fleet_data(tmp_path, list(PINS))
    config = RunConfig(run_name="dp", method="heterotune", backbones=("tiny-3", "tiny-6"), rounds=2, local_steps=3,
                       min_agents=3, pinned=PINS, task=TaskConfig(max_length=32, batch_size=8), learning_rate=5e-3,
                       seed=7, privacy={"clip_norm": 0.05, "target_epsilon": 8.0, "population": 3, "noise_seed": 1})
    assert isinstance(strategy_for(config), DifferentiallyPrivate)
    bundles = build_bundles(config)
    specs = [AgentSpec(a, b, data.client_files[a]) for a, b in PINS.items()]
    run = run_inprocess(config, bundles, specs, data.global_test_file, keep_tensors=True, final_eval=True)
    epsilons = [run.diagnostics[r]["privacy"]["epsilon"] for r in (1, 2)]
    assert 0 < epsilons[0] < epsilons[1] <= 8.0
    assert epsilons[1] == pytest.approx(8.0, rel=1e-3)  # z was calibrated to spend the budget in 2 rounds
    for r in (1, 2):  # every upload the aggregation saw was clipped around the state it started from
        before = run.states[r - 1]
        for agent, tensors in run.updates[r].items():
            reference = {**before.global_tensors, **before.group_tensors[PINS[agent]]}
            norm = math.sqrt(sum(float(np.sum((tensors[n] - reference[n].astype(np.float64)) ** 2))
                                 for n in reference))
            assert norm <= 0.05 * (1 + 1e-9)
    assert len(run.final_global) == 3 and all(e.total > 0 for e in run.final_global.values())
    assert np.isfinite(run.states[2].global_tensors[next(iter(run.states[2].global_tensors))]).all()


def test_a_private_run_over_mqtt_records_its_epsilon_and_refuses_an_overspending_resume(tmp_path: Path) -> None:
    """The engine path: real mosquitto, real agent processes; updates stream into per-group sums after clipping."""
    data = fleet_data(tmp_path, list(PINS))
    privacy = {"clip_norm": 0.05, "target_epsilon": 8.0, "population": 3, "noise_seed": 2}
    config = RunConfig(run_name="dp-mqtt", method="heterotune", backbones=("tiny-3", "tiny-6"), rounds=2,
                       local_steps=3, min_agents=3, pinned=PINS, task=TaskConfig(max_length=32, batch_size=8),
                       round_timeout_s=120, join_timeout_s=120, learning_rate=5e-3, seed=7, privacy=privacy)
    with MosquittoBroker(tmp_path / "broker") as broker, agent_processes(tmp_path, data) as agents:
        run_federation(config, tmp_path / "run", broker=broker.address, start_agents=agents.start)
        codes = agents.wait(60)
    assert all(c == 0 for c in codes.values()), {a: agents.log(a) for a in PINS}
    store = RunStore(tmp_path / "run")
    recorded = [d["privacy"] for d in store.round_diagnostics()]
    store.close()
    assert [r["devices"] for r in recorded] == [3, 3]
    assert recorded[0]["epsilon"] < recorded[1]["epsilon"] == pytest.approx(8.0, rel=1e-3)
    # Resumed asking for 2 more rounds with z recalibrated for 4: the 2 rounds spent at the 2-round z overspend.
    longer = RunConfig.model_validate({**config.model_dump(), "rounds": 4})
    with MosquittoBroker(tmp_path / "broker2") as broker, pytest.raises(PrivacyBudgetError, match="on resume"):
        run_federation(longer, tmp_path / "run", broker=broker.address, resume=True)
