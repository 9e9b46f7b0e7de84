"""An agent keeps to its memory cap for real, emulates a slower device, and follows a change of its profile.

* `DeviceLimits` arithmetic with injected memory readings and sleep (no waiting, no timing asserts);
* a real ORT round on a tiny backbone aborted by the guard, after which the same learner trains normally;
* through a real mosquitto with real agent processes: an agent whose cap is below what it really needs aborts
  its round with a clear message and survives while the run goes on with the other agent; and an agent that
  rejoins with a lower cap is reassigned, gets the smaller group's tensors and its update lands in that group.

Cost cards are replaced by hand-written ones in the two federation tests, so that the assignment does not
depend on how much memory tiny backbones really take on this machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.engine import Coordinator, RoundResult
from coordinator.runner import build_bundles
from coordinator.store import RunStore, load_state
from edge_agent.data import load_examples
from edge_agent.limits import (
    DeviceLimits,
    MemoryCapExceeded,
    check_slowdown,
    current_rss_mb,
    peak_rss_mb,
    slowed_profile,
)
from edge_agent.local_round import LocalLearner, RoundPlan
from edge_agent.trainers.base import Batch
from edge_agent.trainers.ort import OrtTrainer
from export.bundle import Bundle
from protocols import topics
from protocols.messages import Assignment, decode_message
from protocols.mqtt import MqttEndpoint
from protocols.tensors import encode_tensors
from tests.harness import AgentProcesses, agent_processes, fleet_data

TINY_TASK = TaskConfig(max_length=32, batch_size=8)

# ------------------------------------------------------------------------------------- DeviceLimits


class Readings:
    """Scripted memory readings: ``rss`` and ``peak`` are what the guard will see next."""

    def __init__(self, rss: float, peak: float) -> None:
        self.rss, self.peak = rss, peak


def limits(readings: Readings, cap: float | None = 400, slowdown: float = 1.0,
           sleeps: list[float] | None = None) -> DeviceLimits:
    record = sleeps if sleeps is not None else []
    return DeviceLimits(cap, slowdown, sleep=record.append, rss=lambda: readings.rss, peak=lambda: readings.peak)


def test_crossing_the_cap_aborts_with_where_and_how_much() -> None:
    readings = Readings(rss=200, peak=250)
    guard = limits(readings)
    guard.begin()
    guard.after("load", 0.1)
    guard.after("train", 0.1)
    readings.rss, readings.peak = 401, 401
    with pytest.raises(MemoryCapExceeded) as excinfo:
        guard.after("train", 0.1)
    error = excinfo.value
    assert (error.cap_mb, error.reached_mb, error.during) == (400, 401, "training step 2")
    assert "resident memory reached 401 MB during training step 2, above this device's cap of 400 MB" in str(error)
    assert "round was aborted and no update is sent" in str(error)


def test_a_peak_inside_a_step_is_caught_by_the_high_water_mark() -> None:
    readings = Readings(rss=200, peak=250)
    guard = limits(readings)
    guard.begin()
    readings.peak = 450  # went above the cap inside the step and came back down to 200
    with pytest.raises(MemoryCapExceeded, match="reached 450 MB during evaluation batch 1"):
        guard.after("eval", 0.1)


def test_a_peak_from_before_the_round_is_not_this_rounds_doing() -> None:
    readings = Readings(rss=300, peak=480)  # e.g. the bundle download at join peaked above the cap
    guard = limits(readings)
    guard.begin()
    guard.after("load", 0.1)
    guard.after("train", 0.1)  # no new peak, current RSS below the cap: carry on
    readings.peak = 481
    with pytest.raises(MemoryCapExceeded, match="reached 481 MB during training step 2"):
        guard.after("train", 0.1)


def test_already_over_the_cap_when_the_round_starts() -> None:
    with pytest.raises(MemoryCapExceeded, match="during the start of the round"):
        limits(Readings(rss=500, peak=500)).begin()


def test_without_a_cap_nothing_is_checked() -> None:
    readings = Readings(rss=10_000, peak=10_000)
    guard = limits(readings, cap=None)
    guard.begin()
    guard.after("train", 0.1)


def test_slowdown_sleeps_the_missing_time_after_steps_and_eval_batches_only() -> None:
    sleeps: list[float] = []
    guard = limits(Readings(100, 100), slowdown=4.0, sleeps=sleeps)
    guard.begin()
    guard.after("load", 2.0)  # loading the model is not part of the predicted round time
    guard.after("train", 0.5)
    guard.after("eval", 0.25)
    assert sleeps == [1.5, 0.75]  # (4 - 1) x the work: each unit takes 4 x as long in total
    assert guard.slept_seconds == pytest.approx(2.25)
    guard.begin()
    assert guard.slept_seconds == 0


def test_slowdown_arguments_and_reported_gflops() -> None:
    for bad in (0.5, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="slowdown must be a finite number >= 1"):
            check_slowdown(bad)
    profile = {"gflops": 90.0, "cores": 2}
    assert slowed_profile(profile, 4.0) == {"gflops": 22.5, "cores": 2}
    assert profile["gflops"] == 90.0  # not modified in place
    with pytest.raises(ValueError, match="memory cap must be a positive number"):
        DeviceLimits(memory_cap_mb=0)


def test_memory_readings_are_this_process() -> None:
    now = current_rss_mb()
    peak = peak_rss_mb()
    assert 10 < now < 100_000 and peak >= now - 1  # read a moment apart; VmHWM >= VmRSS at each read
    before = current_rss_mb()
    ballast = np.ones(128 * 1024 * 1024 // 8)  # 128 MB, touched; far above glibc's mmap threshold
    assert current_rss_mb() > before + 100
    assert peak_rss_mb() > before + 100
    del ballast


# ------------------------------------------------------------------------ a real round, really aborted


@pytest.fixture(scope="module")
def tiny_bundle() -> Bundle:
    return build_bundles(RunConfig(backbones=("tiny-3",), task=TINY_TASK))["tiny-3"]


@pytest.fixture
def learner(tiny_bundle: Bundle, tmp_path: Path) -> Iterator[LocalLearner]:
    data = fleet_data(tmp_path, ["solo"], per_client=48)
    labels = tiny_bundle.manifest.task.labels
    trainer = OrtTrainer(tiny_bundle.directory, threads=1)
    yield LocalLearner("solo", tiny_bundle.directory, tiny_bundle.manifest, trainer,
                       load_examples(data.client_files["solo"], labels), load_examples(data.global_test_file, labels))


def plan(round_id: int, bundle: Bundle) -> RoundPlan:
    names = tuple(t.name for t in bundle.manifest.tensors if t.scope != "local")
    return RoundPlan(round_id, 4, 8, 5e-3, 0, names)


def test_guard_aborts_a_real_round_mid_training_and_the_learner_carries_on(learner: LocalLearner,
                                                                          tiny_bundle: Bundle) -> None:
    steps = [0]
    train_step: Callable[[Batch], float] = learner.trainer.train_step

    def counting_step(batch: Batch) -> float:
        steps[0] += 1
        return train_step(batch)

    learner.trainer.train_step = counting_step  # type: ignore[method-assign]
    # Real readings, except that from the third step on the process "weighs" 10 GB.
    learner.guard = DeviceLimits(memory_cap_mb=5000, rss=lambda: 10_000.0 if steps[0] >= 3 else current_rss_mb())
    kept_before = {k: v.copy() for k, v in learner.kept.items()}
    with pytest.raises(MemoryCapExceeded, match="during training step 3, above this device's cap of 5000 MB"):
        learner.run_round(plan(1, tiny_bundle), {})
    assert steps[0] == 3  # stopped right after the step that crossed the cap
    for name, value in kept_before.items():  # nothing of the aborted round is kept
        np.testing.assert_array_equal(learner.kept[name], value)

    learner.guard = None
    outcome = learner.run_round(plan(2, tiny_bundle), {})
    assert steps[0] == 3 + 4
    assert set(outcome.upload) == set(plan(2, tiny_bundle).upload_names)
    assert outcome.personal.total > 0 and np.isfinite(outcome.train_loss)


def test_an_absurdly_low_cap_stops_the_round_before_it_loads(learner: LocalLearner, tiny_bundle: Bundle) -> None:
    learner.guard = DeviceLimits(memory_cap_mb=1.0)
    with pytest.raises(MemoryCapExceeded) as excinfo:
        learner.run_round(plan(1, tiny_bundle), {})
    assert excinfo.value.during == "the start of the round"
    assert excinfo.value.reached_mb > 10  # the real resident set of this process
    assert "(--max-memory)" in str(excinfo.value)


# --------------------------------------------------------------------------- federations, crafted cards


def run_with_cards(tmp: Path, config: RunConfig, broker: MosquittoBroker, agents: AgentProcesses,
                   card_mb: dict[str, float],
                   on_round: Callable[[Coordinator, RoundResult], None] | None = None) -> tuple[Coordinator, list[Any]]:
    """`run_federation` minus the reports, with the bundles' peak-RSS cards replaced by ``card_mb``."""
    bundles = build_bundles(config)
    store = RunStore(tmp / "run")
    try:
        coordinator = Coordinator(config, bundles, Coordinator.endpoint_for(broker.host, broker.port), store)
        coordinator.cards = [dataclasses.replace(c, peak_train_rss_mb=card_mb[c.backbone]) for c in coordinator.cards]
        if on_round is not None:
            coordinator.on_round = lambda result: on_round(coordinator, result)
        agents.start(broker.host, broker.port)
        return coordinator, coordinator.run()
    finally:
        store.close()


def test_agent_over_its_cap_aborts_the_round_and_the_run_goes_on(tmp_path: Path) -> None:
    # The card says tiny-3 needs 10 MB, so a device capped at 40 MB is admitted (0.9 x 40 = 36 MB); a real agent
    # process holds far more than 40 MB, so its guard must abort every round it is given.
    config = RunConfig(run_name="memcap", backbones=("tiny-3",), rounds=1, local_steps=2, min_agents=2,
                       task=TINY_TASK, round_timeout_s=10, join_timeout_s=120, min_fraction=0.5)
    data = fleet_data(tmp_path, ["small", "fine"], per_client=48)
    with MosquittoBroker(tmp_path / "broker") as broker, \
            agent_processes(tmp_path, data, extra={"small": ["--max-memory", "40"]}) as agents:
        coordinator, results = run_with_cards(tmp_path, config, broker, agents, {"tiny-3": 10.0})
        codes = agents.wait(60)
        small_log = agents.log("small")
    assert codes == {"small": 0, "fine": 0}, small_log  # the over-cap agent finished the run normally
    assert coordinator.agents["small"].backbone == "tiny-3"
    assert "round 1 aborted: memory cap exceeded: resident memory reached" in small_log
    assert "above this device's cap of 40 MB (--max-memory)" in small_log
    assert len(results) == 1
    rows = RunStore(tmp_path / "run").metrics()
    # The over-cap agent declines (RoundDeclined) instead of leaving the coordinator waiting for the deadline.
    assert sorted((r.round, r.agent_id, r.accepted) for r in rows) == [(1, "fine", True), (1, "small", False)]
    assert next(r for r in rows if r.agent_id == "small").reason.startswith("declined: memory cap exceeded")


def test_rejoin_with_a_lower_cap_moves_the_agent_to_the_smaller_group(tmp_path: Path) -> None:
    # Cards: tiny-6 needs 400 MB, tiny-3 100 MB. a1 first joins with 1000 MB (0.9 x 1000 >= 400: tiny-6); after
    # round 1 it restarts capped at 300 MB (270 < 400: tiny-3). a2 is on tiny-3 throughout.
    config = RunConfig(run_name="rejoin", backbones=("tiny-3", "tiny-6"), rounds=2, local_steps=2, min_agents=2,
                       task=TINY_TASK, round_timeout_s=60, join_timeout_s=120, learning_rate=5e-3)
    data = fleet_data(tmp_path, ["a1", "a2"], per_client=48)
    extra = {"a1": ["--max-memory", "1000"], "a2": ["--max-memory", "300"]}

    def rejoin_lower(coordinator: Coordinator, result: RoundResult) -> None:
        if result.round_id != 1:
            return
        agents.kill("a1")
        agents.extra = {**extra, "a1": ["--max-memory", "300"]}
        agents.start(broker.host, broker.port, ["a1"])
        deadline = time.monotonic() + 90
        record = coordinator.agents["a1"]
        while record.backbone != "tiny-3" or record.status != "online":
            assert time.monotonic() < deadline, "a1 did not rejoin:\n" + agents.log("a1")
            coordinator._pump(0.2)  # the engine's own event loop: take in a1's JoinRequest before round 2
            record = coordinator.agents["a1"]

    with MosquittoBroker(tmp_path / "broker") as broker, agent_processes(tmp_path, data, extra=extra) as agents:
        observer = MqttEndpoint("observer-rejoin", broker.host, broker.port, clean_start=True)
        observer.start()
        try:
            observer.subscribe(topics.agent_inbox("a1"))
            _, results = run_with_cards(tmp_path, config, broker, agents, {"tiny-3": 100.0, "tiny-6": 400.0},
                                        on_round=rejoin_lower)
            assert agents.wait(60) == {"a1": 0, "a2": 0}, agents.log("a1")
            assignments: dict[int, Assignment] = {}
            while (item := observer.get(timeout=0.5)) is not None:
                message = decode_message(item.payload) if item.payload else None
                if isinstance(message, Assignment):
                    assignments[message.round] = message
        finally:
            observer.stop()

    assert len(results) == 2
    run_dir = tmp_path / "run"
    rows = {(r.round, r.agent_id): r for r in RunStore(run_dir).metrics()}
    assert rows[(1, "a1")].backbone == "tiny-6" and rows[(2, "a1")].backbone == "tiny-3"
    assert all(r.accepted for r in rows.values()) and len(rows) == 4

    state1 = load_state(run_dir / "tensors" / "round-0001.safetensors")
    state2 = load_state(run_dir / "tensors" / "round-0002.safetensors")
    # What a1 was sent for round 2: the tiny-3 bundle and exactly the global + tiny-3 group tensors of round 1.
    second = assignments[2]
    assert second.backbone == "tiny-3" and assignments[1].backbone == "tiny-6"
    expected = encode_tensors({**state1.global_tensors, **state1.group_tensors["tiny-3"]})
    assert second.weights.sha256 == hashlib.sha256(expected).hexdigest()
    assert sorted(second.upload_names) == sorted([*state1.global_tensors, *state1.group_tensors["tiny-3"]])
    # Its round-2 update went into the tiny-3 group (with a2's), and the tiny-6 group, now empty, kept its tensors.
    updates = {a: load_file(str(run_dir / "updates" / "round-0002" / f"{a}.safetensors")) for a in ("a1", "a2")}
    weights = {a: rows[(2, a)].n_train for a in updates}
    for name, value in state2.group_tensors["tiny-3"].items():
        mean = sum(weights[a] * updates[a][name].astype(np.float64) for a in updates) / sum(weights.values())
        np.testing.assert_allclose(value, mean, rtol=1e-5, atol=1e-7, err_msg=name)
    for name, value in state1.group_tensors["tiny-6"].items():
        np.testing.assert_array_equal(state2.group_tensors["tiny-6"][name], value)
