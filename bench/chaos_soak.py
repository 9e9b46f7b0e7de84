"""Chaos soak: a real federation under random agent kills, stalls, link cuts and a broker restart, against a
quiet run of the same fleet and seeds; checks from the run directory that nothing accepted was lost.

Two runs of the real coordinator (``run_federation``, the code behind `coordinator run`) with the same data,
configuration and seeds and twelve real `edge-agent join` processes each; a third of the agents reach the broker
through an emulated link (bench/link_emulator.py, unshaped: it is there to be cut). The quiet run has no faults.
The chaos run follows a seeded schedule (bench/chaos_plan.py), tied to round starts seen through the public
observer hooks (coordinator/observers.py):

* kill: SIGKILL an invited agent, start it again a few seconds later with the same id, state and cache;
* stall: SIGSTOP an invited agent for 4, 16 or 24 s, then SIGCONT (the coordinator notices silence after 12 s);
* cut: close every connection through an agent's link, refusing new ones for 0, 3 or 15 s;
* broker restart: the run's own mosquitto (persistence on) stopped with SIGTERM and started again from the same
  mosquitto.conf on the same port after 3 s (what `coordinator run --resume` does with a dead broker).

Afterwards the script reads the chaos run's directory and checks: every round committed (a round abandoned for
too few updates must have been retried and committed), every accepted update is in the committed aggregate of its
round (recomputed from the kept update files) unless its attempt was abandoned and retried, and final accuracy in
both views within ``--tolerance`` points of the quiet run. It writes docs/chaos-soak.md and the chaos run's
`coordinator report` plots into docs/chaos-soak/.

    python -m bench.chaos_soak                      # 30 rounds, 12 agents, quiet + chaos
    python -m bench.chaos_soak --rounds 3 --out runs/bench/chaos-trial --page none   # a sizing trial
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.chaos_plan import Fault, chaos_plan
from bench.chaos_report import REACTIONS, render_page
from bench.common import DEFAULT_OUT, REPO, git_commit
from bench.link_emulator import EdgeLink, LinkSpec
from coordinator.broker import ConfiguredMosquitto, stop_pid
from coordinator.config import RunConfig, TaskConfig
from coordinator.datasets import FleetData, load_tweet_sentiment, write_fleet_data
from coordinator.observers import RoundEnded, RoundStarted, UpdateHandled
from coordinator.run_broker import load_record
from coordinator.runner import run_federation, run_key_path
from protocols.signing import public_path

BACKBONE = "minilm-l3"
LINK = LinkSpec(rate_bps=None, rtt=0.02, loss=0.0)  # unshaped: the link is there to be cut


class Recorder:
    """Observer: keeps every round event (for the checks) and hands round starts to the chaos driver."""

    def __init__(self, starts: queue.Queue[RoundStarted] | None) -> None:
        self.events: list[dict[str, Any]] = []
        self._starts = starts

    def _keep(self, kind: str, event: Any) -> None:
        self.events.append({"event": kind, "t": time.time(), **asdict(event)})

    def round_started(self, event: RoundStarted) -> None:
        self._keep("round_started", event)
        if self._starts is not None:
            self._starts.put(event)

    def update_handled(self, event: UpdateHandled) -> None:
        self._keep("update_handled", event)

    def round_ended(self, event: RoundEnded) -> None:
        self._keep("round_ended", event)


class LogCounter(logging.Handler):
    """Counts the coordinator's reaction lines and keeps them in a file."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = record.getMessage()
        except Exception:  # a malformed record is not worth the soak
            return
        self._file.write(f"{record.created:.3f} {record.levelname} {line}\n")
        self._file.flush()
        for name, needle in REACTIONS.items():
            if needle in line:
                self.counts[name] += 1

    def close(self) -> None:
        self._file.close()
        super().close()


class Fleet:
    """The twelve agent processes (owned by PID), their emulated links, and the faults done to them."""

    def __init__(self, work: Path, data: FleetData, linked: set[str], cache: Path, broker: str | None) -> None:
        self.work, self.data, self.linked, self.cache, self.broker = work, data, linked, cache, broker
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.exits: dict[str, list[int | None]] = {a: [] for a in data.client_files}
        self.links: dict[str, EdgeLink] = {}
        self.stopped: set[str] = set()
        self.key: Path | None = None
        self.target: tuple[str, int] | None = None

    def start_all(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.key = public_path(run_key_path(self.work / "run"))
        for agent_id in sorted(self.data.client_files):
            if agent_id in self.linked:
                self.links[agent_id] = EdgeLink((host, port), LINK)
            self.start(agent_id)

    def address(self, agent_id: str) -> str:
        assert self.target is not None
        if agent_id in self.links:
            return f"127.0.0.1:{self.links[agent_id].port}"
        return self.broker or f"{self.target[0]}:{self.target[1]}"

    def start(self, agent_id: str) -> None:
        (self.work / "agents").mkdir(exist_ok=True)
        log = open(self.work / "agents" / f"{agent_id}.log", "ab")  # noqa: SIM115 - the child holds it
        self.procs[agent_id] = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "join", "--broker", self.address(agent_id), "--id", agent_id,
             "--data", str(self.data.client_files[agent_id]), "--global-test", str(self.data.global_test_file),
             "--threads", "1", "--cache-dir", str(self.cache), "--state-dir", str(self.work / "state" / agent_id),
             "--max-idle", "300", "--coordinator-key", str(self.key)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
        log.close()

    def kill(self, agent_id: str) -> None:
        proc = self.procs[agent_id]
        if agent_id in self.stopped:
            self.cont(agent_id)
        proc.send_signal(signal.SIGKILL)
        self.exits[agent_id].append(proc.wait(10))

    def stall(self, agent_id: str) -> None:
        self.procs[agent_id].send_signal(signal.SIGSTOP)
        self.stopped.add(agent_id)

    def cont(self, agent_id: str) -> None:
        if agent_id in self.stopped:
            self.procs[agent_id].send_signal(signal.SIGCONT)
            self.stopped.discard(agent_id)

    def finish(self, timeout: float = 120.0) -> dict[str, list[int | None]]:
        """Wait for every agent to exit by itself (after the run's Finish), then end leftovers by PID."""
        for agent_id in list(self.stopped):
            self.cont(agent_id)
        deadline = time.monotonic() + timeout
        for agent_id, proc in self.procs.items():
            try:
                code: int | None = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                code = None  # did not exit by itself
            self.exits[agent_id].append(code)
        for link in self.links.values():
            link.close()
        return self.exits


class ChaosDriver(threading.Thread):
    """Applies the plan: a round start (from the observer) schedules that round's faults; one thread does them
    all in time order, so the observer never blocks and faults never race each other."""

    def __init__(self, fleet: Fleet, plan: list[Fault], run_dir: Path, log_path: Path) -> None:
        super().__init__(daemon=True, name="chaos")
        self.fleet, self.run_dir, self.log_path = fleet, run_dir, log_path
        self.starts: queue.Queue[RoundStarted] = queue.Queue()
        self.by_round: dict[int, list[Fault]] = {}
        for fault in plan:
            self.by_round.setdefault(fault.round_id, []).append(fault)
        self.done: list[dict[str, Any]] = []
        self.busy: dict[str, float] = {}  # agent -> when its current fault ends
        self.selected: dict[int, tuple[str, ...]] = {}  # round -> the agents its latest attempt invited
        self.broker: ConfiguredMosquitto | None = None
        self._halt = threading.Event()
        self._heap: list[tuple[float, int, str, str, Fault]] = []
        self._seq = 0

    def stop(self) -> None:
        self._halt.set()
        self.join(30)

    def _push(self, at: float, action: str, agent: str, fault: Fault) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, action, agent, fault))

    def _note(self, action: str, agent: str, fault: Fault, **extra: Any) -> None:
        entry = {"t": time.time(), "action": action, "agent": agent, **asdict(fault), **extra}
        self.done.append(entry)
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def _pick(self, fault: Fault, selected: tuple[str, ...], now: float) -> str | None:
        if fault.kind == "cut":
            pool = sorted(a for a in selected if a in self.fleet.links) or sorted(self.fleet.links)
        else:
            pool = sorted(selected)
        free = [a for a in pool[fault.pick % len(pool):] + pool[: fault.pick % len(pool)]
                if self.busy.get(a, 0.0) <= now] if pool else []
        return free[0] if free else None

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                event = self.starts.get(timeout=0.1)
                if event.attempt == 0:
                    now = time.monotonic()
                    for fault in self.by_round.get(event.round_id, []):
                        self._push(now + fault.offset_s, "begin", "", fault)
                self.selected[event.round_id] = event.selected
            except queue.Empty:
                pass
            while self._heap and self._heap[0][0] <= time.monotonic():
                _, _, action, agent, fault = heapq.heappop(self._heap)
                try:
                    self._act(action, agent, fault)
                except Exception as exc:  # a fault that could not be done is recorded, never fatal to the soak
                    self._note("failed", agent, fault, error=repr(exc))
        # the run is over: undo what is still pending (a stalled agent must see its Finish, a cut link work)
        for _, _, action, agent, fault in sorted(self._heap):
            if action in ("resume", "reconnect"):
                self._act(action, agent, fault)

    def _act(self, action: str, agent: str, fault: Fault) -> None:
        now = time.monotonic()
        if action == "begin":
            if fault.kind == "broker_restart":
                record = load_record(self.run_dir / "broker")
                if record is None or not record.embedded or record.pid is None or record.config is None:
                    self._note("skipped", "", fault, why="not this run's own broker")
                    return
                if not stop_pid(record.pid, Path(record.config)):
                    self._note("failed", "", fault, error=f"the run's broker (pid {record.pid}) was not found running")
                    return
                self._note("broker_stopped", "", fault, pid=record.pid)
                self._push(now + fault.duration_s, "broker_start", "", fault)
                return
            target = self._pick(fault, self.selected.get(fault.round_id, ()), now)
            if target is None:
                self._note("skipped", "", fault, why="no free agent")
                return
            self.busy[target] = now + fault.duration_s + 1.0
            if fault.kind == "kill":
                self.fleet.kill(target)
                self._push(now + fault.duration_s, "restart", target, fault)
            elif fault.kind == "stall":
                self.fleet.stall(target)
                self._push(now + fault.duration_s, "resume", target, fault)
            else:
                link = self.fleet.links[target]
                link.refuse = fault.duration_s > 0
                link.cut()
                self._push(now + fault.duration_s, "reconnect", target, fault)
            self._note(fault.kind, target, fault)
        elif action == "restart":
            self.fleet.start(agent)
            self._note("restarted", agent, fault)
        elif action == "resume":
            self.fleet.cont(agent)
            self._note("resumed", agent, fault)
        elif action == "reconnect":
            self.fleet.links[agent].refuse = False
            self._note("link_up", agent, fault)
        elif action == "broker_start":
            record = load_record(self.run_dir / "broker")
            assert record is not None and record.config is not None
            self.broker = ConfiguredMosquitto(Path(record.config), record.host, record.port)
            self.broker.start()
            self._note("broker_started", "", fault, pid=self.broker.pid)


def fleet_data(work: Path, agents: list[str], seed: int) -> FleetData:
    return write_fleet_data(load_tweet_sentiment(max_samples=250 * len(agents), seed=seed), agents, work / "data",
                            alpha=1.0, seed=seed, global_per_class=50, max_per_client=150)


def one_run(name: str, out: Path, plan: list[Fault] | None, args: argparse.Namespace) -> dict[str, Any]:
    work = out / name
    if work.exists():
        raise SystemExit(f"{work} exists from an earlier soak; remove it (or give another --out) first")
    work.mkdir(parents=True)
    agents = [f"edge-{i:02d}" for i in range(1, args.agents + 1)]
    data = fleet_data(work, agents, args.seed)
    linked = set(agents[2::3])  # a third of the fleet behind an emulated link
    config = RunConfig(run_name=f"chaos-soak-{name}", backbones=(BACKBONE,), rounds=args.rounds,
                       local_steps=args.local_steps, min_agents=args.agents, agents_per_round=args.per_round,
                       over_selection=args.over_selection, min_fraction=args.min_fraction,
                       max_round_attempts=args.attempts, round_timeout_s=args.round_timeout, join_timeout_s=900,
                       task=TaskConfig(max_length=32, batch_size=8), seed=args.seed)
    fleet = Fleet(work, data, linked, out / "agent-cache", args.broker)
    driver = ChaosDriver(fleet, plan, work / "run", work / "chaos.jsonl") if plan is not None else None
    recorder = Recorder(driver.starts if driver else None)
    counter = LogCounter(work / "coordinator.log")
    coordinator_log = logging.getLogger("coordinator")
    coordinator_log.addHandler(counter)
    if coordinator_log.getEffectiveLevel() > logging.INFO:
        coordinator_log.setLevel(logging.INFO)
    started = time.time()
    load_before = os.getloadavg()
    summary: dict[str, Any] = {}
    error = ""
    try:
        if driver:
            driver.start()
        summary = run_federation(config, work / "run", broker=args.broker, start_agents=fleet.start_all,
                                 observers=[recorder])
    except Exception as exc:  # the soak reports a crash as its finding instead of losing the records
        logging.getLogger("bench").exception("the %s run failed", name)
        error = repr(exc)
    finally:
        if driver:
            driver.stop()
        exits = fleet.finish()
        if driver and driver.broker is not None:
            driver.broker.stop()
        coordinator_log.removeHandler(counter)
        counter.close()
    result = {"name": name, "summary": summary, "error": error, "events": recorder.events,
              "chaos": driver.done if driver else [], "reactions": dict(counter.counts), "exits": exits,
              "linked": sorted(linked), "wall_seconds": time.time() - started, "load_before": load_before,
              "load_after": os.getloadavg(), "config": config.model_dump(mode="json")}
    (work / "soak.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--agents", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=6, help="agents_per_round (the round's target)")
    parser.add_argument("--over-selection", type=float, default=1.3)
    parser.add_argument("--min-fraction", type=float, default=0.5)
    parser.add_argument("--attempts", type=int, default=3, help="max_round_attempts")
    parser.add_argument("--round-timeout", type=float, default=90.0)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7, help="data, run and chaos schedule seed")
    parser.add_argument("--tolerance", type=float, default=2.0, help="accuracy points chaos may lose vs quiet")
    parser.add_argument("--broker", default=None,
                        help="an external broker HOST:PORT (a list later, with failover); default: the run's own "
                             "mosquitto, which the broker-restart fault restarts")
    parser.add_argument("--runs", nargs="+", choices=["quiet", "chaos"], default=["quiet", "chaos"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "chaos-soak")
    parser.add_argument("--page", type=Path, default=REPO / "docs" / "chaos-soak.md",
                        help="the generated page ('none': no page)")
    parser.add_argument("--render-only", action="store_true", help="only check and write the page from --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    plan = chaos_plan(args.rounds, args.seed)
    for name in [] if args.render_only else args.runs:
        run = one_run(name, args.out, plan if name == "chaos" else None, args)
        print(f"{name}: final {run['summary'].get('final', {}).get('global_accuracy')} global, "
              f"{run['summary'].get('final', {}).get('personal_accuracy')} personal; {run['wall_seconds']:.0f} s",
              flush=True)
    runs = {n: json.loads((args.out / n / "soak.json").read_text()) for n in ("quiet", "chaos")
            if (args.out / n / "soak.json").is_file()}
    if str(args.page) == "none" or set(runs) != {"quiet", "chaos"}:
        return 0
    results = {"commit": git_commit(REPO), "args": {k: str(v) for k, v in vars(args).items()},
               "plan": [asdict(f) for f in plan], "runs": runs}
    plots = args.page.parent / args.page.stem
    if plots.exists():
        shutil.rmtree(plots)
    ok = render_page(results, args.out, args.page, plots, tolerance=args.tolerance)
    print(f"wrote {args.page}; checks {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1

if __name__ == "__main__":
    raise SystemExit(main())
