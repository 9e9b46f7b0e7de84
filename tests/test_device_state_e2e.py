"""Durable device state in a real federation: real mosquitto, real `edge-agent join` processes, real ORT.

One federation, five agents. After every victim has saved at least two rounds, four of them are killed with
SIGKILL; before they are started again (same id, same --state-dir) the state of three is damaged: one is left
intact, one gets its newest tensor file truncated, one gets a bit flipped in it, one gets both copies truncated.
The run must finish with every agent, and each restarted agent's first upload must be exactly what a round
started from the tensors it should have resumed from gives (the intact state, the previous good copy, or the
bundle's initial tensors), recomputed here from the run directory's stored global tensors and the state files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.datasets import FleetData
from coordinator.federation_state import weights_for
from coordinator.runner import build_bundles
from coordinator.store import RunStore, load_state
from edge_agent.bundle_store import BundleStore
from edge_agent.data import Example, load_examples, split_local
from edge_agent.device_state import CURRENT, PREVIOUS, DeviceModel, DeviceStateError, load_model, round_label
from edge_agent.local_round import LocalLearner, RoundPlan
from edge_agent.trainers.ort import OrtTrainer
from tests.harness import agent_processes, fleet_data
from tests.test_faults import committed_rounds, finish, run_in_thread, wait_for

PINS = {"intact": "tiny-3", "truncated": "tiny-6", "flipped": "tiny-3", "both": "tiny-6", "steady": "tiny-3"}
VICTIMS = ("intact", "truncated", "flipped", "both")
TOLERANCE = 1e-5
SAVED = re.compile(r"round (\d+): device state saved")


def _config() -> RunConfig:
    return RunConfig(run_name="device-state", backbones=("tiny-3", "tiny-6"), rounds=5, local_steps=10,
                     min_agents=len(PINS), pinned=PINS, task=TaskConfig(max_length=32, batch_size=8),
                     round_timeout_s=60, join_timeout_s=120, learning_rate=5e-3, min_fraction=0.2, seed=3)


@dataclass
class Federation:
    tmp: Path
    data: FleetData
    config: RunConfig
    start_from: dict[str, DeviceModel | None]  # what each victim should resume from (None: bundle initial)
    logs_after_restart: dict[str, str]
    codes: dict[str, int | None]
    warned: dict[str, str]


def _state_dir(tmp: Path, agent_id: str) -> Path:
    return tmp / "state" / agent_id


def _current_round(state_dir: Path) -> int:
    try:
        model = load_model(state_dir)
    except DeviceStateError:
        return -1
    slot = next(state_dir.glob("*/*"))
    return model.round_id if (slot / PREVIOUS).exists() else -1


def _tensor_file(slot: Path, json_name: str) -> Path:
    return slot / json.loads((slot / json_name).read_text())["tensor_file"]


def _damage(state_dir: Path, how: str) -> None:
    slot = next(state_dir.glob("*/*"))
    newest = _tensor_file(slot, CURRENT)
    data = bytearray(newest.read_bytes())
    if how == "truncated":
        newest.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flipped":
        data[-7] ^= 0x04
        newest.write_bytes(bytes(data))
    elif how == "both":
        for name in (CURRENT, PREVIOUS):
            path = _tensor_file(slot, name)
            path.write_bytes(path.read_bytes()[:100])


def _expected_start(state_dir: Path, how: str, tmp: Path) -> DeviceModel | None:
    """What the victim should resume from, read from a pristine copy of its state (before the damage)."""
    copy = tmp / "pristine" / state_dir.name
    shutil.copytree(state_dir, copy)
    if how == "both":
        return None
    if how != "intact":
        for slot in copy.glob("*/*"):
            (slot / CURRENT).unlink()  # what is left is the previous good copy
    return load_model(copy)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    tmp = tmp_path_factory.mktemp("device-state")
    config = _config()
    build_bundles(config)  # export before the clock starts
    data = fleet_data(tmp, list(PINS))
    extra = {agent_id: ["--state-dir", str(_state_dir(tmp, agent_id))] for agent_id in PINS}
    start_from: dict[str, DeviceModel | None] = {}
    offsets: dict[str, int] = {}
    with MosquittoBroker(tmp / "broker") as broker, agent_processes(tmp, data, extra=extra) as agents:
        thread, outcome = run_in_thread(config, tmp / "run", broker, agents)
        wait_for(lambda: all(_current_round(_state_dir(tmp, v)) >= 2 for v in VICTIMS)
                 and committed_rounds(tmp / "run") >= 2, 400, "every victim to save two rounds")
        time.sleep(0.3)  # round 3 is under way: the victims are training, not in the middle of a save
        for victim in VICTIMS:
            agents.kill(victim)
        for victim in VICTIMS:
            start_from[victim] = _expected_start(_state_dir(tmp, victim), victim, tmp)
            _damage(_state_dir(tmp, victim), victim)
            offsets[victim] = (tmp / f"{victim}.log").stat().st_size
        time.sleep(0.5)
        agents.start(broker.host, broker.port, list(VICTIMS))
        finish(thread, outcome, agents, timeout=600)
        codes = agents.wait(90)
    logs = {v: (tmp / f"{v}.log").read_bytes()[offsets[v]:].decode(errors="replace") for v in VICTIMS}
    warned = {v: "\n".join(line for line in logs[v].splitlines() if "WARNING" in line) for v in VICTIMS}
    return Federation(tmp, data, config, start_from, logs, codes, warned)


def _first_round_after_restart(federation: Federation, victim: str) -> int:
    found = SAVED.search(federation.logs_after_restart[victim])
    assert found, f"{victim} trained no round after its restart:\n{federation.logs_after_restart[victim][-3000:]}"
    return int(found.group(1))


def _replay(federation: Federation, victim: str, round_id: int, initial: dict[str, np.ndarray] | None
            ) -> tuple[dict[str, np.ndarray], float]:
    """The upload and personal accuracy of ``victim``'s round ``round_id`` started from ``initial`` (None: the
    bundle's initial tensors), with the round's received tensors taken from the run directory."""
    final = load_model(_state_dir(federation.tmp, victim))
    store = BundleStore(final.bundle_dir.parent)
    manifest = store.manifest(final.bundle_sha)
    labels = manifest.task.labels
    stored = load_file(str(federation.tmp / "run" / "updates" / f"round-{round_id:04d}" / f"{victim}.safetensors"))
    received = weights_for(load_state(federation.tmp / "run" / "tensors" / f"round-{round_id - 1:04d}.safetensors"),
                           PINS[victim])
    learner = LocalLearner(victim, final.bundle_dir, manifest, OrtTrainer(final.bundle_dir, threads=1),
                           load_examples(federation.data.client_files[victim], labels),
                           load_examples(federation.data.global_test_file, labels), initial=initial)
    config = federation.config
    plan = RoundPlan(round_id, config.local_steps, config.task.batch_size, config.learning_rate, config.seed,
                     tuple(stored))
    outcome = learner.run_round(plan, received)
    return outcome.upload, outcome.personal.accuracy


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[n].astype(np.float64) - b[n]))) for n in a)


def _stored_update(federation: Federation, victim: str, round_id: int) -> dict[str, np.ndarray]:
    return load_file(str(federation.tmp / "run" / "updates" / f"round-{round_id:04d}" / f"{victim}.safetensors"))


def test_every_agent_finishes_the_run(federation: Federation) -> None:
    assert all(code == 0 for code in federation.codes.values()), federation.codes
    rows = RunStore(federation.tmp / "run").metrics()
    assert max(r.round for r in rows) == federation.config.rounds


@pytest.mark.parametrize("victim", VICTIMS)
def test_restarted_agent_resumes_from_the_right_tensors(federation: Federation, victim: str) -> None:
    round_id = _first_round_after_restart(federation, victim)
    start = federation.start_from[victim]
    stored = _stored_update(federation, victim, round_id)
    replayed, personal = _replay(federation, victim, round_id, dict(start.tensors) if start else None)
    assert _max_diff(replayed, stored) <= TOLERANCE
    row = next(r for r in RunStore(federation.tmp / "run").metrics() if r.round == round_id and r.agent_id == victim)
    assert row.personal_accuracy == pytest.approx(personal, abs=1e-9)
    if start is not None:
        # The comparison can tell: the same round from the bundle's initial head gives another upload.
        fresh, _ = _replay(federation, victim, round_id, None)
        assert _max_diff(fresh, stored) > 100 * TOLERANCE
        assert f"resumed run {start.run_id} from the device state of round {start.round_id}" in \
            federation.logs_after_restart[victim]


@pytest.mark.parametrize("victim", ["truncated", "flipped"])
def test_damaged_state_is_a_warning_and_a_fallback_to_the_previous_copy(federation: Federation,
                                                                       victim: str) -> None:
    warned = federation.warned[victim]
    assert "newest copy unusable" in warned and "using the previous good copy" in warned, warned
    # A truncated file is caught by its size before it is read, a flipped bit by its sha256.
    assert ("bytes, not" if victim == "truncated" else "does not match its sha256") in warned, warned


def test_no_usable_copy_is_a_warning_and_a_fresh_start(federation: Federation) -> None:
    warned = federation.warned["both"]
    assert "starting from the bundle's initial tensors" in warned and "no usable device state" in warned, warned


@pytest.mark.parametrize("agent_id", list(PINS))
def test_last_trained_round_is_saved_with_its_metrics(federation: Federation, agent_id: str) -> None:
    """The state saved after the device's last training round (the copy the final evaluation's save keeps as the
    previous good one) holds that round's metrics and every trainable tensor, the shared ones as uploaded."""
    trained = _previous_copy(federation, agent_id)
    rows = RunStore(federation.tmp / "run").metrics()
    last = max((r for r in rows if r.agent_id == agent_id), key=lambda r: r.round)
    assert trained.round_id == last.round
    assert trained.metrics["personal_accuracy"] == pytest.approx(last.personal_accuracy, abs=1e-9)
    assert trained.metrics["global_accuracy"] == pytest.approx(last.global_accuracy, abs=1e-9)
    assert trained.metrics["n_train"] == last.n_train and trained.metrics["backend"] == "ort"
    assert trained.backbone == PINS[agent_id] and trained.optimizer == {}
    # Every trainable tensor of the bundle, including the local head the coordinator never sees.
    manifest = BundleStore(trained.bundle_dir.parent).manifest(trained.bundle_sha)
    assert set(trained.tensors) == {t.name for t in manifest.tensors}
    assert "head.weight" in trained.tensors and "head.weight" not in _stored_update(federation, agent_id, last.round)
    # The shared tensors it saved are the ones it uploaded in that round.
    for name, value in _stored_update(federation, agent_id, last.round).items():
        np.testing.assert_array_equal(trained.tensors[name], value)


@pytest.mark.parametrize("agent_id", list(PINS))
def test_final_model_is_the_final_aggregate_over_the_devices_own_tensors(federation: Federation,
                                                                         agent_id: str) -> None:
    """After the run's final evaluation the device keeps the model it evaluated: the final aggregate's shared
    tensors over its own local ones (head), with the accuracies the run's summary reports for it."""
    final = load_model(_state_dir(federation.tmp, agent_id))
    store = RunStore(federation.tmp / "run")
    last_round = store.last_round()
    assert final.round_id == last_round + 1  # the evaluation, after the last committed round
    assert round_label(final.round_id, final.metrics) == f"the final evaluation of round {last_round}"
    summary = json.loads((federation.tmp / "run" / "summary.json").read_text())["final"]["agents"][agent_id]
    assert final.metrics["personal_accuracy"] == pytest.approx(summary["personal_accuracy"], abs=1e-9)
    assert final.metrics["global_accuracy"] == pytest.approx(summary["global_accuracy"], abs=1e-9)
    aggregate = load_state(federation.tmp / "run" / "tensors" / f"round-{last_round:04d}.safetensors")
    shared = {**aggregate.global_tensors, **aggregate.group_tensors[PINS[agent_id]]}
    assert final.received and set(final.received) <= set(shared)
    for name, value in final.received.items():
        np.testing.assert_array_equal(final.tensors[name], shared[name])
        np.testing.assert_array_equal(value, shared[name])
    trained = _previous_copy(federation, agent_id)
    assert "head.weight" not in final.received
    np.testing.assert_array_equal(final.tensors["head.weight"], trained.tensors["head.weight"])


@pytest.mark.parametrize("agent_id", ["intact", "steady"])
def test_predict_on_its_own_test_split_gives_the_accuracy_it_reported(federation: Federation, agent_id: str,
                                                                     tmp_path: Path) -> None:
    """`edge-agent predict --state-dir --file` with the device's final model on its own test split (the split
    LocalLearner evaluates on) gives the personal accuracy the device reported in the run's final evaluation."""
    state_dir = _state_dir(federation.tmp, agent_id)
    final = load_model(state_dir)
    examples = load_examples(federation.data.client_files[agent_id], final.labels)
    test = [e for e in split_local(examples, test_fraction=0.25, seed=0).test if isinstance(e, Example)]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"text": e.text, "label": final.labels[e.label]}) + "\n" for e in test))
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "predict", "--state-dir", str(state_dir),
                             "--file", str(test_file), "--json"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    reported = json.loads((federation.tmp / "run" / "summary.json").read_text())["final"]["agents"][agent_id]
    assert len(doc["predictions"]) == len(test) == reported["n_test"]
    assert doc["accuracy"] == pytest.approx(reported["personal_accuracy"], abs=1e-9)


def _previous_copy(federation: Federation, agent_id: str) -> DeviceModel:
    """The device's state as it was before its newest save: the previous good copy kept beside the current one."""
    state_dir = _state_dir(federation.tmp, agent_id)
    copy = federation.tmp / "previous" / agent_id
    if not copy.exists():
        shutil.copytree(state_dir, copy)
        for slot in copy.glob("*/*"):
            (slot / CURRENT).unlink()  # what is left is the previous good copy
    return load_model(copy)
