"""Stalls: an agent frozen with SIGSTOP mid-round (its TCP connection stays open, so the broker sees nothing) is
noticed by its missing heartbeats, replaced from the agents standing by, and every agent is told how the run
ended and exits with the documented code.

Real mosquitto, real agent processes, tiny backbones, --threads 1. The frozen agent is continued (SIGCONT) at the
end and every process is ended by PID (tests/harness.py).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig
from coordinator.observers import RoundEnded, RoundStarted, UpdateHandled
from coordinator.runner import build_bundles, run_federation
from coordinator.store import RunStore
from edge_agent.agent import EXIT_FINISHED, EXIT_RUN_ABORTED
from protocols.liveness import HEARTBEAT_INTERVAL_S, STALL_AFTER_S
from tests.harness import AgentProcesses, agent_processes, fleet_data
from tests.test_faults import committed_rounds, tiny_config, wait_for

FOUR = {"a1": "tiny-3", "a2": "tiny-3", "a3": "tiny-6", "a4": "tiny-6"}
ROUND_TIMEOUT_S = 60  # short: the frozen agent, continued at the end, gives up its round at the deadline


class Freezer:
    """A round observer that freezes (SIGSTOP) the first invited agent the moment round 1 starts, and notes when
    the coordinator gave up on it. Runs on the engine's thread: only a signal and a few assignments."""

    def __init__(self, agents: AgentProcesses) -> None:
        self.agents = agents
        self.victim: str | None = None
        self.stopped_at = self.noticed_at = 0.0
        self.noticed_reason = ""
        self.selected: tuple[str, ...] = ()

    def round_started(self, event: RoundStarted) -> None:
        if event.round_id == 1 and event.attempt == 0 and self.victim is None:
            self.victim, self.selected = event.selected[0], event.selected
            os.kill(self.agents.procs[self.victim].pid, signal.SIGSTOP)
            self.stopped_at = time.monotonic()

    def update_handled(self, event: UpdateHandled) -> None:
        if event.agent_id == self.victim and event.outcome == "lost" and not self.noticed_at:
            self.noticed_at, self.noticed_reason = time.monotonic(), event.reason

    def round_ended(self, event: RoundEnded) -> None:
        pass


def run_with(config: Any, run_dir: Path, broker: MosquittoBroker, agents: AgentProcesses,
             freezer: Freezer) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = run_federation(config, run_dir, broker=broker.address, start_agents=agents.start,
                                                observers=[freezer])
        except BaseException as exc:  # surfaced by the test
            outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def exit_codes_within(agents: AgentProcesses, ids: list[str], since: float, limit: float) -> dict[str, tuple[
        int | None, float]]:
    """Each agent's exit code and when it exited (seconds after ``since``), waiting until ``since + limit``."""
    out: dict[str, tuple[int | None, float]] = {}
    while len(out) < len(ids) and time.monotonic() < since + limit:
        for agent_id in ids:
            code = agents.procs[agent_id].poll()
            if agent_id not in out and code is not None:
                out[agent_id] = (code, time.monotonic() - since)
        time.sleep(0.05)
    return out


def thaw(agents: AgentProcesses, victim: str | None) -> None:
    if victim is not None and agents.procs[victim].poll() is None:
        os.kill(agents.procs[victim].pid, signal.SIGCONT)


def round_seconds(run_dir: Path) -> dict[int, float]:
    with sqlite3.connect(run_dir / "coordinator.sqlite") as db:
        return {r: f - s for r, s, f in db.execute("SELECT round_id, started, finished FROM rounds")}


Exits = dict[str, tuple[int | None, float]]


def run_with_one_frozen(tmp_path: Path, config: RunConfig) -> tuple[Freezer, dict[str, Any], Exits, int,
                                                                     dict[str, str]]:
    """Run ``config`` on four real agents, one frozen with SIGSTOP as round 1 starts: the freezer, the run's
    outcome, each healthy agent's (exit code, seconds after the run ended) within 15 s, the victim's exit code
    once thawed, and each healthy agent's whole log."""
    build_bundles(tiny_config(FOUR))  # export before the clock starts
    data = fleet_data(tmp_path, list(FOUR))
    with MosquittoBroker(tmp_path / "broker") as broker, agent_processes(tmp_path, data) as agents:
        freezer = Freezer(agents)
        try:
            thread, outcome = run_with(config, tmp_path / "run", broker, agents, freezer)
            thread.join(600)
            assert not thread.is_alive(), "the run did not finish"
            assert "error" not in outcome, outcome.get("error")
            healthy = sorted(set(FOUR) - {str(freezer.victim)})
            exits = exit_codes_within(agents, healthy, outcome["ended"], 15)
        finally:
            thaw(agents, freezer.victim)
        victim_exit = agents.procs[str(freezer.victim)].wait(180)  # it gets the Finish once it runs again
        logs = {a: agents.full_log(a) for a in healthy}
    return freezer, outcome, exits, victim_exit, logs


def test_a_frozen_agent_is_noticed_and_replaced_from_standby_long_before_the_deadline(tmp_path: Path) -> None:
    """Three of four agents invited per round (no over-selection), one frozen as round 1 starts: it is declared
    stalled about STALL_AFTER_S later, the fourth agent is invited in its place, round 1 commits with three updates
    well before the deadline, round 2 goes on without the frozen agent, and the healthy agents exit 0."""
    config = tiny_config(FOUR, rounds=2, local_steps=20, agents_per_round=3, over_selection=1.0, min_fraction=0.5,
                         round_timeout_s=ROUND_TIMEOUT_S)
    freezer, outcome, exits, victim_exit, _ = run_with_one_frozen(tmp_path, config)
    healthy = sorted(set(FOUR) - {str(freezer.victim)})
    summary = outcome["summary"]
    noticed = freezer.noticed_at - freezer.stopped_at
    print(f"\nfrozen {freezer.victim}: noticed {noticed:.1f} s after SIGSTOP ({freezer.noticed_reason}); rounds "
          f"{round_seconds(tmp_path / 'run')}; healthy exits {exits}")
    assert freezer.noticed_at, "the frozen agent was never given up on"
    # by its silence (its last beat came up to one interval before the stop), long before the deadline
    assert STALL_AFTER_S - HEARTBEAT_INTERVAL_S <= noticed < ROUND_TIMEOUT_S / 2, noticed
    assert "stalled" in freezer.noticed_reason
    assert summary["rounds"] == 2 and not summary["stopped"]
    metrics = RunStore(tmp_path / "run").metrics()
    accepted = {r: {m.agent_id for m in metrics if m.round == r and m.accepted} for r in (1, 2)}
    standby = set(FOUR) - set(freezer.selected)
    assert accepted[1] == (set(freezer.selected) - {freezer.victim}) | standby, accepted  # the standby filled in
    assert freezer.victim not in accepted[2] and len(accepted[2]) == 3, accepted
    assert round_seconds(tmp_path / "run")[1] < ROUND_TIMEOUT_S / 2
    assert exits == {a: (EXIT_FINISHED, exits[a][1]) for a in healthy}, exits  # each within 15 s of the end
    assert victim_exit == EXIT_FINISHED


def test_with_min_fraction_one_a_frozen_agent_aborts_the_run_and_every_healthy_agent_exits_7(tmp_path: Path) -> None:
    """min_fraction = 1.0 and one attempt per round: the frozen agent makes round 1 miss its minimum, the run is
    aborted, and every healthy agent is told (a signed Finish with code "aborted") and exits 7 within 15 s."""
    config = tiny_config(FOUR, rounds=2, local_steps=20, min_fraction=1.0, max_round_attempts=1,
                         round_timeout_s=ROUND_TIMEOUT_S)
    freezer, outcome, exits, victim_exit, logs = run_with_one_frozen(tmp_path, config)
    healthy = sorted(set(FOUR) - {str(freezer.victim)})
    summary = outcome["summary"]
    print(f"\nfrozen {freezer.victim}: noticed {freezer.noticed_at - freezer.stopped_at:.1f} s after SIGSTOP; "
          f"healthy exits {exits}; stopped: {summary['stopped']}")
    assert summary["rounds"] == 0 and "round 1 missed its minimum" in summary["stopped"]
    assert exits == {a: (EXIT_RUN_ABORTED, exits[a][1]) for a in healthy}, exits
    assert all("missed its minimum" in log for log in logs.values())  # told why
    assert victim_exit == EXIT_RUN_ABORTED


def test_a_coordinator_stopped_with_sigterm_tells_every_agent_which_exits_7(tmp_path: Path) -> None:
    """`coordinator run` gets SIGTERM once both agents joined: each agent gets a Finish with code
    "coordinator_stopped" and exits 7 within 15 s; the coordinator exits non-zero."""
    pins = {"a1": "tiny-3", "a2": "tiny-3"}
    build_bundles(tiny_config(pins, backbones=("tiny-3",)))
    data = fleet_data(tmp_path, list(pins))
    config = tmp_path / "run.toml"
    config.write_text(
        'run_name = "sigterm"\nbackbones = ["tiny-3"]\nrounds = 50\nlocal_steps = 20\nmin_agents = 2\n'
        "round_timeout_s = 120\njoin_timeout_s = 180\nlearning_rate = 0.005\n[task]\nmax_length = 32\n"
        'batch_size = 8\n[pinned]\n' + "".join(f'{a} = "{b}"\n' for a, b in pins.items()))
    run_dir = tmp_path / "run"
    with MosquittoBroker(tmp_path / "broker") as broker, agent_processes(tmp_path, data) as agents:
        with open(tmp_path / "coordinator.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "run", "--config", str(config),
                                     "--out", str(run_dir), "--broker", broker.address], stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            agents.start(broker.host, broker.port)
            wait_for(lambda: committed_rounds(run_dir) >= 1, 300, "round 1 to commit")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) != 0
            ended = time.monotonic()
            exits = exit_codes_within(agents, list(pins), ended, 15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        logs = {a: agents.full_log(a) for a in pins}
    print(f"\nagents after the coordinator's SIGTERM: {exits}")
    assert exits == {a: (EXIT_RUN_ABORTED, exits[a][1]) for a in pins}, (exits, logs)
    assert all("coordinator_stopped" in log for log in logs.values()), logs
