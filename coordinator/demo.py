"""The demo: a real federated run on one machine.

Our own mosquitto on loopback, the coordinator, and four edge-agent processes emulating two Raspberry-Pi
class devices (memory cap 384 MB: only MiniLM-L3 fits) and two Jetson-class devices (2 GB: MiniLM-L6), each
holding a Dirichlet(0.3) label-skewed share of real tweets, plus a balanced held-out set for the global view.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from coordinator.config import RunConfig
from coordinator.datasets import load_tweet_sentiment, write_fleet_data
from coordinator.runner import run_federation
from export.bundle import single_thread_env

# (agent id, memory cap in MB). 0.8 x 384 MB admits MiniLM-L3 (~260 MB measured) but not L6 (~350 MB).
DEMO_FLEET: tuple[tuple[str, float], ...] = (("pi4-a", 384), ("pi4-b", 384), ("orin-a", 2048), ("orin-b", 2048))


def demo_config(rounds: int = 5, seed: int = 0) -> RunConfig:
    return RunConfig(run_name="demo", method="heterotune", backbones=("minilm-l3", "minilm-l6"), rounds=rounds,
                     local_steps=20, learning_rate=2e-3, min_agents=len(DEMO_FLEET), join_timeout_s=300,
                     round_timeout_s=300, seed=seed)


def run_demo(out_dir: Path, *, rounds: int = 5, seed: int = 0, samples: int = 8000,
             max_per_client: int = 600, fleet: tuple[tuple[str, float], ...] = DEMO_FLEET) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = load_tweet_sentiment(max_samples=samples, seed=seed)
    data = write_fleet_data(dataset, [agent_id for agent_id, _ in fleet], out_dir / "data", alpha=0.3, seed=seed,
                            global_per_class=100, max_per_client=max_per_client)
    processes: list[subprocess.Popen[bytes]] = []

    def start_agents(host: str, port: int) -> None:
        logs = out_dir / "agents"
        logs.mkdir(exist_ok=True)
        for agent_id, memory_mb in fleet:
            command = [sys.executable, "-m", "edge_agent.cli", "join", "--broker", f"{host}:{port}",
                       "--id", agent_id, "--data", str(data.client_files[agent_id]),
                       "--global-test", str(data.global_test_file), "--max-memory", str(memory_mb),
                       "--threads", "1", "--cache-dir", str(logs / agent_id), "--max-idle", "600"]
            with open(logs / f"{agent_id}.log", "wb") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  env=single_thread_env()))

    try:
        return run_federation(demo_config(rounds, seed), out_dir, start_agents=start_agents)
    finally:
        _stop(processes)


def _stop(processes: list[subprocess.Popen[bytes]], grace_s: float = 20.0) -> None:
    """Agents leave on the coordinator's Finish; anything still running after the grace period is ours to end."""
    deadline = time.monotonic() + grace_s
    for proc in processes:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
