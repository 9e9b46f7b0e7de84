"""A fleet mixing ORT and PyTorch agents aggregates to the same model as an all-ORT fleet.

Two real federations through a real mosquitto, on the same data and seeds: one with every agent on ONNX Runtime,
one with half the agents forced to `--backend torch`. If the torch backend's updates equal ORT's (within float
rounding), every committed aggregate of the two runs must agree within 1e-4. Tiny backbones: this test is about
the backends being interchangeable in the whole system, not about learning (tests/test_torch_backend.py checks
the real MiniLM weights).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.datasets import FleetData, load_tweet_sentiment, write_fleet_data
from coordinator.runner import run_federation
from coordinator.store import RunStore, load_state
from protocols.bundle_manifest import MANIFEST_NAME, BundleManifest
from tests.numerics import rel_diff

PINS = {"m1": "tiny-3", "m2": "tiny-3", "m3": "tiny-6", "m4": "tiny-6"}
MIXED = {"m1": "ort", "m2": "torch", "m3": "torch", "m4": "ort"}
ALL_ORT = dict.fromkeys(PINS, "ort")
ROUNDS = 2
RTOL = 1e-4


def run_fleet(tmp: Path, data: FleetData, backends: dict[str, str]) -> Path:
    config = RunConfig(run_name="mixed", backbones=("tiny-3", "tiny-6"), rounds=ROUNDS, local_steps=3,
                       min_agents=len(PINS), pinned=PINS, task=TaskConfig(max_length=32, batch_size=8),
                       round_timeout_s=120, join_timeout_s=120, learning_rate=5e-3, seed=4)
    processes: list[subprocess.Popen[bytes]] = []

    def start_agents(host: str, port: int) -> None:
        for agent_id, backend in backends.items():
            log = open(tmp / f"{agent_id}.log", "wb")  # noqa: SIM115 - closed by the OS when the agent exits
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "join", "--broker", f"{host}:{port}", "--id", agent_id,
                 "--data", str(data.client_files[agent_id]), "--global-test", str(data.global_test_file),
                 "--threads", "1", "--backend", backend, "--cache-dir", str(tmp / "cache" / agent_id),
                 "--max-idle", "120", "--coordinator-key", str(tmp / "run" / "keys" / "run-key.pub")],
                stdout=log, stderr=subprocess.STDOUT))

    with MosquittoBroker(tmp / "broker") as broker:
        try:
            run_federation(config, tmp / "run", broker=broker.address, start_agents=start_agents)
            codes = [proc.wait(60) for proc in processes]
        finally:
            for proc in processes:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
    logs = {a: (tmp / f"{a}.log").read_text()[-1500:] for a in backends}
    assert codes == [0] * len(backends), f"agents did not finish cleanly: {codes}\n{logs}"
    return tmp / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("mixed")
    data = write_fleet_data(load_tweet_sentiment(max_samples=900, seed=2), list(PINS), tmp / "data",
                            alpha=1.0, seed=2, global_per_class=20, max_per_client=120)
    return {name: run_fleet(tmp / name, data, backends)
            for name, backends in (("all-ort", ALL_ORT), ("mixed", MIXED))}


def test_mixed_fleet_completes_with_each_agent_on_its_forced_backend(runs: dict[str, Path]) -> None:
    rows = RunStore(runs["mixed"]).metrics()
    assert {(r.round, r.agent_id) for r in rows} == {(r, a) for r in range(1, ROUNDS + 1) for a in PINS}
    assert all(r.accepted for r in rows), [r.reason for r in rows if not r.accepted]
    assert {r.agent_id: r.backend for r in rows} == MIXED


def test_mixed_aggregate_equals_the_all_ort_aggregate(runs: dict[str, Path]) -> None:
    worst = 0.0
    for round_id in range(1, ROUNDS + 1):
        ort = load_state(RunStore(runs["all-ort"]).tensors_path(round_id))
        mixed = load_state(RunStore(runs["mixed"]).tensors_path(round_id))
        before = load_state(RunStore(runs["all-ort"]).tensors_path(round_id - 1))
        assert set(mixed.global_tensors) == set(ort.global_tensors)
        for name, value in ort.global_tensors.items():
            assert not np.array_equal(value, before.global_tensors[name]), f"{name} did not move; vacuous"
            worst = max(worst, rel_diff(mixed.global_tensors[name], value))
            assert rel_diff(mixed.global_tensors[name], value) <= RTOL, (round_id, name)
        for backbone, tensors in ort.group_tensors.items():
            for name, value in tensors.items():
                worst = max(worst, rel_diff(mixed.group_tensors[backbone][name], value))
                assert rel_diff(mixed.group_tensors[backbone][name], value) <= RTOL, (round_id, backbone, name)
    print(f"worst relative difference between the mixed and the all-ORT aggregates: {worst:.2e}")


def test_only_torch_agents_download_the_torch_part(runs: dict[str, Path]) -> None:
    for agent_id, backend in MIXED.items():
        parts = list((runs["mixed"].parent / "cache" / agent_id).rglob("backbone.safetensors"))
        assert bool(parts) == (backend == "torch"), agent_id
    ort_first = {r.agent_id: r.bytes_down for r in RunStore(runs["all-ort"]).metrics() if r.round == 1}
    mixed_first = {r.agent_id: r.bytes_down for r in RunStore(runs["mixed"]).metrics() if r.round == 1}
    for agent_id, backend in MIXED.items():
        if backend == "ort":  # an ORT device downloads exactly what it did before the torch part existed
            assert mixed_first[agent_id] == ort_first[agent_id], agent_id
        else:  # a torch device downloads the torch backbone instead of the ORT checkpoint and training graphs
            bundle = next((runs["mixed"].parent / "cache" / agent_id).rglob("backbone.safetensors")).parent
            assert not (bundle / "checkpoint").exists() and not (bundle / "training_model.onnx").exists()
            manifest = BundleManifest.model_validate_json((bundle / MANIFEST_NAME).read_text())
            torch_part = sum(p.size for p in manifest.parts_for("torch").values())
            ort_parts = sum(p.size for p in manifest.parts_for("ort").values())
            assert mixed_first[agent_id] - ort_first[agent_id] == torch_part - ort_parts, agent_id
