"""End to end through a real mosquitto: a coordinator and 3 agent processes on two backbones, 2 rounds.

Tiny random-init backbones (this test is about plumbing, not learning), real tweets, real ORT training, real
agent processes. The test then recomputes each round's aggregate from the updates the coordinator accepted,
with its own numpy implementation of the rule, and compares it with what the coordinator committed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.datasets import load_tweet_sentiment, write_fleet_data
from coordinator.runner import run_federation
from coordinator.store import RunStore, load_state
from export.dema.config import DEFAULT_SCOPES, family_of

PINS = {"a1": "tiny-3", "a2": "tiny-6", "a3": "tiny-6"}


def start_agent_processes(tmp: Path, files: dict[str, Path], global_test: Path, host: str, port: int,
                          processes: list[subprocess.Popen[bytes]]) -> None:
    for agent_id, data in files.items():
        log = open(tmp / f"{agent_id}.log", "wb")  # noqa: SIM115 - closed by the OS when the agent exits
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "join", "--broker", f"{host}:{port}", "--id", agent_id,
             "--data", str(data), "--global-test", str(global_test), "--threads", "1",
             "--cache-dir", str(tmp / "cache" / agent_id), "--max-idle", "120",
             "--coordinator-key", str(tmp / "run" / "keys" / "run-key.pub")],
            stdout=log, stderr=subprocess.STDOUT))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    tmp = tmp_path_factory.mktemp("e2e")
    data = write_fleet_data(load_tweet_sentiment(max_samples=900, seed=1), list(PINS), tmp / "data",
                            alpha=1.0, seed=1, global_per_class=20, max_per_client=120)
    config = RunConfig(run_name="e2e", backbones=("tiny-3", "tiny-6"), rounds=2, local_steps=3, min_agents=3,
                       pinned=PINS, task=TaskConfig(max_length=32, batch_size=8), round_timeout_s=120,
                       join_timeout_s=120, learning_rate=5e-3)
    processes: list[subprocess.Popen[bytes]] = []
    with MosquittoBroker(tmp / "broker") as broker:
        try:
            summary = run_federation(
                config, tmp / "run", broker=broker.address,
                start_agents=lambda h, p: start_agent_processes(tmp, data.client_files, data.global_test_file,
                                                                h, p, processes))
            codes = [proc.wait(60) for proc in processes]
        finally:
            for proc in processes:
                if proc.poll() is None:
                    proc.kill()
    logs = {a: (tmp / f"{a}.log").read_text()[-2000:] for a in PINS}
    assert codes == [0, 0, 0], f"agents did not finish cleanly: {codes}\n{logs}"
    return tmp / "run", summary


def test_all_rounds_complete_with_every_agent(finished_run: tuple[Path, dict[str, object]]) -> None:
    run_dir, summary = finished_run
    assert summary["rounds"] == 2
    assert summary["agents"] == PINS
    rows = RunStore(run_dir).metrics()
    assert {(r.round, r.agent_id) for r in rows} == {(r, a) for r in (1, 2) for a in PINS}
    assert all(r.accepted and r.bytes_up > 0 and r.bytes_down > 0 and r.backend == "ort" for r in rows)
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("round", "agent_id", "backbone", "personal_accuracy", "global_accuracy", "n_test",
                   "bytes_up", "bytes_down", "train_seconds", "peak_rss_mb"):
        assert column in header


def test_uploads_hold_exactly_the_group_and_global_tensors(finished_run: tuple[Path, dict[str, object]]) -> None:
    run_dir, _ = finished_run
    initial = load_state(run_dir / "tensors" / "round-0000.safetensors")
    for round_id in (1, 2):
        for agent_id, backbone in PINS.items():
            update = load_file(str(run_dir / "updates" / f"round-{round_id:04d}" / f"{agent_id}.safetensors"))
            scopes = {DEFAULT_SCOPES[family_of(name)] for name in update}
            assert scopes == {"global", "group"}, "a local tensor (the head) left the device"
            expected = set(initial.global_tensors) | set(initial.group_tensors[backbone])
            assert set(update) == expected


def _reference_heterotune(theta: dict[str, np.ndarray], groups: dict[str, list[tuple[int, dict]]],
                          ) -> dict[str, np.ndarray]:
    """CMGA with two groups, written out independently of coordinator/aggregation."""
    out = {}
    for name, value in theta.items():
        totals = {g: sum(n for n, _ in ups) for g, ups in groups.items()}
        means = {g: sum(n * (u[name].astype(np.float64) - value) for n, u in ups) / totals[g]
                 for g, ups in groups.items()}
        projected = {}
        for g, vec in means.items():
            (other,) = [c for c in means if c != g]
            dot = float(np.vdot(vec, means[other]))
            norm2 = float(np.vdot(means[other], means[other]))
            projected[g] = vec - dot / norm2 * means[other] if dot < 0 and norm2 > 0 else vec
        weight = {g: totals[g] / sum(totals.values()) for g in totals}
        out[name] = value + sum(weight[g] * projected[g] for g in projected)
    return out


def test_committed_aggregate_equals_the_rule_on_what_was_received(
        finished_run: tuple[Path, dict[str, object]]) -> None:
    run_dir, _ = finished_run
    rows = {(r.round, r.agent_id): r for r in RunStore(run_dir).metrics()}
    for round_id in (1, 2):
        before = load_state(run_dir / "tensors" / f"round-{round_id - 1:04d}.safetensors")
        after = load_state(run_dir / "tensors" / f"round-{round_id:04d}.safetensors")
        updates = {a: load_file(str(run_dir / "updates" / f"round-{round_id:04d}" / f"{a}.safetensors"))
                   for a in PINS}
        groups: dict[str, list[tuple[int, dict]]] = {}
        for agent_id, backbone in PINS.items():
            groups.setdefault(backbone, []).append((rows[(round_id, agent_id)].n_train, updates[agent_id]))
        expected_global = _reference_heterotune(before.global_tensors, groups)
        for name, value in expected_global.items():
            np.testing.assert_allclose(after.global_tensors[name], value, rtol=1e-5, atol=1e-7)
            assert not np.allclose(after.global_tensors[name], before.global_tensors[name]), name
        for backbone, ups in groups.items():
            total = sum(n for n, _ in ups)
            for name in before.group_tensors[backbone]:
                mean = sum(n * u[name].astype(np.float64) for n, u in ups) / total
                np.testing.assert_allclose(after.group_tensors[backbone][name], mean, rtol=1e-5, atol=1e-7)
