"""Shared helpers for tests that run whole federations: agent processes, fleet data, and an independent
re-computation of what each committed round should contain."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from coordinator.datasets import FleetData, load_tweet_sentiment, write_fleet_data
from coordinator.store import RunStore, load_state


def fleet_data(tmp: Path, agent_ids: list[str], *, per_client: int = 120, seed: int = 1) -> FleetData:
    return write_fleet_data(load_tweet_sentiment(max_samples=200 * len(agent_ids), seed=seed), agent_ids,
                            tmp / "data", alpha=1.0, seed=seed, global_per_class=20, max_per_client=per_client)


class AgentProcesses:
    """Real `edge-agent join` processes; the test owns them and ends them by PID."""

    def __init__(self, tmp: Path, data: FleetData, *, extra: Mapping[str, list[str]] | None = None,
                 coordinator_key: Path | None = None) -> None:
        """``coordinator_key``: the run key's public half the agents verify against (tests about trust); without
        one the agents run with --insecure-no-verify (tests about anything else, whose runs generate their key)."""
        self.tmp, self.data, self.extra = tmp, data, extra or {}
        self.trust = ["--coordinator-key", str(coordinator_key)] if coordinator_key else ["--insecure-no-verify"]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, host: str, port: int, agent_ids: list[str] | None = None, *, brokers: str | None = None) -> None:
        """``brokers``: a whole --broker value (e.g. a cluster's HOST:PORT,HOST:PORT) instead of host:port."""
        for agent_id in agent_ids or list(self.data.client_files):
            log = open(self.tmp / f"{agent_id}.log", "ab")  # noqa: SIM115 - the child holds it
            self.procs[agent_id] = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "join", "--broker", brokers or f"{host}:{port}",
                 "--id", agent_id,
                 "--data", str(self.data.client_files[agent_id]), "--global-test", str(self.data.global_test_file),
                 "--threads", "1", "--cache-dir", str(self.tmp / "cache" / agent_id), "--max-idle", "120",
                 *self._trust(agent_id), *self.extra.get(agent_id, [])],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            log.close()

    def _trust(self, agent_id: str) -> list[str]:
        """How the agent checks the coordinator's messages, unless its extra arguments say it themselves."""
        own = self.extra.get(agent_id, [])
        return [] if "--insecure-no-verify" in own or "--coordinator-key" in own else self.trust

    def full_log(self, agent_id: str) -> str:
        return (self.tmp / f"{agent_id}.log").read_text(errors="replace")

    def kill(self, agent_id: str) -> None:
        os.kill(self.procs[agent_id].pid, signal.SIGKILL)
        self.procs[agent_id].wait(10)

    def wait(self, timeout: float = 60) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for agent_id, proc in self.procs.items():
            try:
                codes[agent_id] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                codes[agent_id] = None
        return codes

    def log(self, agent_id: str) -> str:
        return (self.tmp / f"{agent_id}.log").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)


@contextlib.contextmanager
def agent_processes(tmp: Path, data: FleetData, **kwargs: Any) -> Iterator[AgentProcesses]:
    agents = AgentProcesses(tmp, data, **kwargs)
    try:
        yield agents
    finally:
        agents.stop_all()


def reference_heterotune(theta: Mapping[str, np.ndarray],
                         groups: Mapping[str, list[tuple[int, Mapping[str, np.ndarray]]]]) -> dict[str, np.ndarray]:
    """CMGA for one or two groups, written out independently of coordinator/aggregation."""
    out = {}
    totals = {g: sum(n for n, _ in ups) for g, ups in groups.items()}
    for name, value in theta.items():
        v = value.astype(np.float64)
        means = {g: sum(n * (u[name].astype(np.float64) - v) for n, u in ups) / totals[g] for g, ups in groups.items()}
        projected = {}
        for g, vec in means.items():
            projected[g] = vec
            for other in (c for c in means if c != g):
                dot, norm2 = float(np.vdot(vec, means[other])), float(np.vdot(means[other], means[other]))
                if dot < 0 and norm2 > 0:
                    projected[g] = vec - dot / norm2 * means[other]
        weight = {g: totals[g] / sum(totals.values()) for g in totals}
        out[name] = v + sum(weight[g] * projected[g] for g in projected)
    return out


def assert_rounds_follow_the_rule(run_dir: Path, backbone_of: Mapping[str, str]) -> int:
    """Every committed round equals heterotune applied to exactly the updates it accepted; returns rounds checked.

    Only updates marked accepted are used, so a rejected update that leaked into the aggregate fails this."""
    store = RunStore(run_dir)
    try:
        rows = store.metrics()
        last = store.last_round()
    finally:
        store.close()
    for round_id in range(1, last + 1):
        before = load_state(run_dir / "tensors" / f"round-{round_id - 1:04d}.safetensors")
        after = load_state(run_dir / "tensors" / f"round-{round_id:04d}.safetensors")
        accepted = [r for r in rows if r.round == round_id and r.accepted]
        assert accepted, f"round {round_id} committed without accepted updates"
        groups: dict[str, list[tuple[int, Mapping[str, np.ndarray]]]] = {}
        for row in accepted:
            update = load_file(str(run_dir / "updates" / f"round-{round_id:04d}" / f"{row.agent_id}.safetensors"))
            groups.setdefault(backbone_of[row.agent_id], []).append((row.n_train, update))
        for name, value in reference_heterotune(before.global_tensors, groups).items():
            np.testing.assert_allclose(after.global_tensors[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        for backbone, ups in groups.items():
            total = sum(n for n, _ in ups)
            for name in before.group_tensors[backbone]:
                mean = sum(n * u[name].astype(np.float64) for n, u in ups) / total
                np.testing.assert_allclose(after.group_tensors[backbone][name], mean, rtol=1e-5, atol=1e-6)
    return last
