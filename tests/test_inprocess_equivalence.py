"""The in-process benchmark path and the MQTT path give the same tensors for one round.

Why: bench/methods.py runs federations without a broker for speed, and its numbers are only evidence about
the product if the tensors are the product's. Same config, bundles, data files and seeds on both sides:
a real mosquitto with a coordinator and three `edge-agent join` processes (tiny-3 / tiny-6 backbones, so the
test is quick), and `bench.methods_federation.run_inprocess`. Each agent's upload and the round-1 aggregate
must agree within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from bench.methods_federation import AgentSpec, FederationRun, run_inprocess
from coordinator.aggregation import FederatedState
from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.datasets import FleetData
from coordinator.runner import build_bundles, run_federation
from coordinator.store import RunStore, load_state
from tests.harness import agent_processes, fleet_data

PINS = {"a1": "tiny-3", "a2": "tiny-6", "a3": "tiny-6"}
TOLERANCE = 1e-5


def _config() -> RunConfig:
    return RunConfig(run_name="equivalence", method="heterotune", backbones=("tiny-3", "tiny-6"), rounds=1,
                     local_steps=3, min_agents=len(PINS), pinned=PINS, task=TaskConfig(max_length=32, batch_size=8),
                     round_timeout_s=120, join_timeout_s=120, learning_rate=5e-3, seed=7)


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FederationRun]:
    tmp = tmp_path_factory.mktemp("equivalence")
    data: FleetData = fleet_data(tmp, list(PINS))
    config = _config()
    with MosquittoBroker(tmp / "broker") as broker, agent_processes(tmp, data) as agents:
        run_federation(config, tmp / "run", broker=broker.address, start_agents=agents.start)
        codes = agents.wait(60)
    assert all(c == 0 for c in codes.values()), {a: agents.log(a) for a in PINS}
    specs = [AgentSpec(a, b, data.client_files[a]) for a, b in PINS.items()]
    inprocess = run_inprocess(config, build_bundles(config), specs, data.global_test_file, keep_tensors=True,
                              final_eval=False)
    return tmp / "run", inprocess


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b)
    return max((float(np.max(np.abs(a[n].astype(np.float64) - b[n]))) for n in a), default=0.0)


def _assert_states_close(mqtt: FederatedState, inproc: FederatedState) -> None:
    assert _max_diff(mqtt.global_tensors, inproc.global_tensors) <= TOLERANCE
    assert set(mqtt.group_tensors) == set(inproc.group_tensors)
    for group in mqtt.group_tensors:
        assert _max_diff(mqtt.group_tensors[group], inproc.group_tensors[group]) <= TOLERANCE, group


def test_initial_states_are_identical(both_paths: tuple[Path, FederationRun]) -> None:
    run_dir, inprocess = both_paths
    mqtt = load_state(run_dir / "tensors" / "round-0000.safetensors")
    assert mqtt.global_tensors and all(mqtt.group_tensors.values())
    _assert_states_close(mqtt, inprocess.states[0])


def test_each_agents_upload_matches(both_paths: tuple[Path, FederationRun]) -> None:
    run_dir, inprocess = both_paths
    for agent_id in PINS:
        mqtt = load_file(str(run_dir / "updates" / "round-0001" / f"{agent_id}.safetensors"))
        assert _max_diff(mqtt, inprocess.updates[1][agent_id]) <= TOLERANCE, agent_id


def test_round_one_aggregate_matches(both_paths: tuple[Path, FederationRun]) -> None:
    run_dir, inprocess = both_paths
    before = load_state(run_dir / "tensors" / "round-0000.safetensors")
    mqtt = load_state(run_dir / "tensors" / "round-0001.safetensors")
    _assert_states_close(mqtt, inprocess.states[1])
    # Not trivially equal: training moved the shared tensors.
    assert _max_diff(before.global_tensors, mqtt.global_tensors) > 100 * TOLERANCE


def test_metrics_match(both_paths: tuple[Path, FederationRun]) -> None:
    """Same sample counts and the same evaluation results (accuracy is a count, so it must be exact)."""
    run_dir, inprocess = both_paths
    store = RunStore(run_dir)
    try:
        rows = {r.agent_id: r for r in store.metrics() if r.round == 1}
    finally:
        store.close()
    for mine in inprocess.rounds:
        theirs = rows[mine.agent_id]
        assert theirs.n_train == mine.n_train
        assert theirs.n_test == mine.personal_total
        assert theirs.personal_accuracy == pytest.approx(mine.personal_correct / mine.personal_total)
        assert mine.global_correct is not None
        assert theirs.global_accuracy == pytest.approx(mine.global_correct / mine.global_total)
        assert theirs.bytes_up == mine.bytes_up
