"""The demo: a real federated run on one machine, with the default fleet or one from a fleet file.

Our own mosquitto on loopback, the coordinator, and one edge-agent process per emulated device, each holding a
Dirichlet label-skewed share of real tweets, plus a balanced held-out set for the global view. The default
fleet is two Raspberry-Pi class devices (memory cap 384 MB: only MiniLM-L3 fits) and two Jetson-class devices
(2 GB: MiniLM-L6). `coordinator demo --fleet FILE` emulates the device classes of a fleet file instead
(coordinator/fleet.py): every agent enforces its memory cap and runs at its class's speed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator.assignment import cost_cards_of
from coordinator.config import RunConfig
from coordinator.datasets import PUBLIC_STEM, FleetData, load_tweet_sentiment, write_fleet_data
from coordinator.fleet import AgentPlan, DataSplit, EmulatedAgent, expected_members, plan_fleet
from coordinator.methods import public_samples_for
from coordinator.runner import build_bundles, run_federation, run_key_path
from export.bundle import single_thread_env
from protocols.signing import public_path

# (agent id, memory cap in MB). The cost cards measure a whole agent process (MiniLM-L3 ~312 MB, L6 ~410 MB
# on the builder), so at the default memory fraction (coordinator/assignment.py DEFAULT_MEMORY_FRACTION, 0.9)
# 0.9 x 384 MB = 346 MB admits MiniLM-L3 but not L6, and 0.9 x 2048 MB admits L6.
DEMO_FLEET: tuple[tuple[str, float], ...] = (("pi4-a", 384), ("pi4-b", 384), ("orin-a", 2048), ("orin-b", 2048))


def demo_config(rounds: int = 5, seed: int = 0) -> RunConfig:
    return RunConfig(run_name="demo", method="heterotune", backbones=("minilm-l3", "minilm-l6"), rounds=rounds,
                     local_steps=20, learning_rate=2e-3, min_agents=len(DEMO_FLEET), join_timeout_s=300,
                     round_timeout_s=300, seed=seed)


def demo_agents(fleet: Sequence[tuple[str, float]] = DEMO_FLEET) -> list[EmulatedAgent]:
    """The default fleet as emulated agents (full speed, capped memory)."""
    return [EmulatedAgent(agent_id, memory_mb, device_class=agent_id.rsplit("-", 1)[0])
            for agent_id, memory_mb in fleet]


def run_demo(out_dir: Path, *, rounds: int = 5, seed: int = 0, samples: int = 8000,
             max_per_client: int = 600, fleet: tuple[tuple[str, float], ...] = DEMO_FLEET) -> dict[str, Any]:
    """The README's demo: the default fleet, 5 rounds of HeteroTune on MiniLM-L3/L6."""
    data = DataSplit(samples_per_agent=max_per_client)
    return run_fleet(out_dir, demo_agents(fleet), demo_config(rounds, seed), data, seed=seed, samples=samples)


def plan_for(agents: Sequence[EmulatedAgent], config: RunConfig, data: DataSplit) -> tuple[RunConfig, list[AgentPlan]]:
    """What the coordinator will decide for the fleet (from the built or reused bundles' cost cards), and the
    config with ``min_agents`` set to the number of agents it admits, so round 1 waits for exactly those."""
    cards = [card for b in build_bundles(config).values() for card in cost_cards_of(b.manifest)]
    plans = plan_fleet(agents, cards, config, eval_samples=data.eval_samples(len(config.task.labels)))
    return config.model_copy(update={"min_agents": max(1, expected_members(plans))}), plans


def agent_command(agent: EmulatedAgent, host: str, port: int, data_file: Path, global_test: Path,
                  cache_dir: Path, public: Path | None = None, coordinator_key: Path | None = None, *,
                  state_dir: Path | None = None) -> list[str]:
    """`edge-agent join` for one emulated device: its cap (sent and enforced), speed, round limit and backend,
    the run's public set when the run distils, the key it verifies the coordinator with, and where it keeps its
    trained model."""
    command = [sys.executable, "-m", "edge_agent.cli", "join", "--broker", f"{host}:{port}", "--id", agent.agent_id,
               "--data", str(data_file), "--global-test", str(global_test), "--max-memory", f"{agent.memory_mb:g}",
               "--threads", "1", "--cache-dir", str(cache_dir), "--max-idle", "600"]
    command += ["--coordinator-key", str(coordinator_key)] if coordinator_key else ["--insecure-no-verify"]
    if state_dir is not None:
        command += ["--state-dir", str(state_dir)]
    if public is not None:
        command += ["--public", str(public)]
    if agent.slowdown != 1:
        command += ["--slowdown", repr(agent.slowdown)]
    if agent.max_round_seconds is not None:
        command += ["--max-round-seconds", f"{agent.max_round_seconds:g}"]
    if agent.backend is not None:
        command += ["--backend", agent.backend]
    return command


def run_fleet(out_dir: Path, agents: Sequence[EmulatedAgent], config: RunConfig, data: DataSplit, *,
              seed: int = 0, samples: int | None = None) -> dict[str, Any]:
    """Write each agent's data, start one `edge-agent join` process per agent and run the federation.

    Only the fleet's own agent ids are admitted, and every agent verifies the coordinator's messages against the
    run key generated into the run directory (keys/run-key.pub) before the agents start."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.allowed_agents is None:
        config = config.model_copy(update={"allowed_agents": tuple(a.agent_id for a in agents)})
    samples = samples or max(8000, 2 * len(agents) * data.samples_per_agent)
    dataset = load_tweet_sentiment(max_samples=samples, seed=seed)
    public_size = public_samples_for(config)
    files = write_fleet_data(dataset, [a.agent_id for a in agents], out_dir / "data", alpha=data.alpha, seed=seed,
                             global_per_class=data.global_test_per_class, max_per_client=data.samples_per_agent,
                             public_size=public_size)
    public = out_dir / "data" / f"{PUBLIC_STEM}.jsonl" if public_size else None
    return run_agents(out_dir, agents, config, files, public)


def run_agents(out_dir: Path, agents: Sequence[EmulatedAgent], config: RunConfig, files: FleetData,
               public: Path | None = None) -> dict[str, Any]:
    """Start one `edge-agent join` process per agent on its data file and run the federation."""
    processes: list[subprocess.Popen[bytes]] = []

    def start_agents(host: str, port: int) -> None:
        logs = out_dir / "agents"
        logs.mkdir(exist_ok=True)
        for agent in agents:
            command = agent_command(agent, host, port, files.client_files[agent.agent_id], files.global_test_file,
                                    logs / agent.agent_id, public, public_path(run_key_path(out_dir)),
                                    state_dir=device_state_dir(out_dir, agent.agent_id))
            with open(logs / f"{agent.agent_id}.log", "wb") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  env=single_thread_env()))

    try:
        return run_federation(config, out_dir, start_agents=start_agents)
    finally:
        _stop(processes)


def device_state_dir(out_dir: Path, agent_id: str) -> Path:
    """Where a demo device keeps its fine-tuned model (`edge-agent join --state-dir`)."""
    return out_dir / "devices" / agent_id


def model_locations(out_dir: Path, agent_ids: Sequence[str], example: str = "what a great day at the beach"
                    ) -> list[str]:
    """The demo's closing lines: each device's model directory, and one command to try one of them."""
    found = [(agent_id, device_state_dir(out_dir, agent_id)) for agent_id in sorted(agent_ids)
             if device_state_dir(out_dir, agent_id).is_dir()]
    if not found:
        return []
    lines = ["each device's fine-tuned model (saved after every round):"]
    lines += [f"  {agent_id}: {path}" for agent_id, path in found]
    lines.append(f"try one: edge-agent predict --state-dir {found[0][1]} --text \"{example}\"")
    return lines


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
