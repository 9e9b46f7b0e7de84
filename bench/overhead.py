"""Part 1: round overhead of the demo fleet, split into its parts.

The demo fleet (coordinator.demo: two MiniLM-L3 "Pi" agents capped at 384 MB and two MiniLM-L6 "Jetson"
agents, real tweets, 20 local steps, one thread each) runs for a few rounds with bundles already in the
agents' caches. The coordinator is `TimedCoordinator` and the agents are `bench.timed_agent` (the real join
loop with timestamps), so each round's wall time can be laid out along the slowest agent's path:

    weights publish -> assignment -> weights download -> device set-up -> train + eval (not overhead)
    -> upload -> validation -> waiting for the other agents -> close round -> aggregation -> commit

overhead = (round wall time - slowest agent's train + eval time) / round wall time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, log, median, python_env, stop_process
from bench.timed_coordinator import DetailedTimedCoordinator, RoundTimes, TimedRunStore

PARTS: tuple[tuple[str, str], ...] = (
    ("weights_publish", "weights publish (encode + retained chunks)"),
    ("assignment", "assignment (publish all, broker, agent picks it up)"),
    ("download", "weights download (subscribe, retained chunks, sha256)"),
    ("device_setup", "device set-up (checkpoint reload, Module + Optimizer)"),
    ("device_misc", "device other (decode, status, read tensors)"),
    ("upload", "upload (encode, chunks + report through the broker)"),
    ("validation", "validation (decode, checks, save update, ack)"),
    ("wait_others", "waiting for the other agents' uploads"),
    ("close", "close round (clear weight blobs)"),
    ("aggregation", "aggregation (strategy.aggregate)"),
    ("commit", "commit (state file + SQLite)"),
    ("tail", "other coordinator time"),
)


def run(out_dir: Path, *, rounds: int = 4, seed: int = 0, time_limit_s: float = 900.0) -> dict[str, Any]:
    """Run the timed demo fleet and return per-round breakdowns (rounds >= 2 are the cached steady state)."""
    from coordinator.broker import MosquittoBroker
    from coordinator.datasets import load_tweet_sentiment, write_fleet_data
    from coordinator.demo import DEMO_FLEET, demo_config
    from coordinator.engine import Coordinator
    from coordinator.runner import build_bundles
    from edge_agent.bundle_store import BundleStore

    out_dir.mkdir(parents=True, exist_ok=True)
    config = demo_config(rounds=rounds, seed=seed).model_copy(update={"join_timeout_s": 180.0,
                                                                      "round_timeout_s": 300.0})
    bundles = build_bundles(config)
    alpha, global_per_class, per_client = demo_data_split()
    dataset = load_tweet_sentiment(max_samples=8000, seed=seed)
    fleet = [agent_id for agent_id, _ in DEMO_FLEET]
    data = write_fleet_data(dataset, fleet, out_dir / "data", alpha=alpha, seed=seed,
                            global_per_class=global_per_class, max_per_client=per_client)
    # "Once bundles are cached": every agent finds its bundle on disk and never downloads it.
    cache = out_dir / "agent-cache"
    store = BundleStore(cache / "bundles")
    for bundle in bundles.values():
        if not store.has(bundle.sha256):
            store.install(bundle.sha256, bundle.archive_bytes())
    timelines = out_dir / "timelines"
    timelines.mkdir(exist_ok=True)
    for old in timelines.glob("*.jsonl"):
        old.unlink()

    fleet_caps, adjusted = fleet_memory_caps(DEMO_FLEET, bundles, config.memory_fraction)
    processes: list[subprocess.Popen[bytes]] = []
    started = time.time()
    shutil.rmtree(out_dir / "run", ignore_errors=True)  # a leftover run would be resumed, not run again
    run_store = TimedRunStore(out_dir / "run")
    try:
        with MosquittoBroker(out_dir / "broker") as broker:
            coordinator = DetailedTimedCoordinator(config, bundles, Coordinator.endpoint_for(broker.host, broker.port),
                                                   run_store, expected_agents=len(fleet_caps))
            for agent_id, memory_mb in fleet_caps:
                command = [sys.executable, "-m", "bench.timed_agent", "--broker", broker.address, "--id", agent_id,
                           "--data", str(data.client_files[agent_id]), "--global-test", str(data.global_test_file),
                           "--max-memory", str(memory_mb), "--threads", "1", "--cache-dir", str(cache),
                           "--max-idle", str(int(time_limit_s)), "--timeline", str(timelines / f"{agent_id}.jsonl")]
                with open(out_dir / f"{agent_id}.log", "wb") as agent_log:
                    processes.append(subprocess.Popen(command, cwd=REPO, stdout=agent_log,
                                                      stderr=subprocess.STDOUT, env=python_env(1)))
            log(f"overhead: demo fleet of {len(DEMO_FLEET)} agents, {rounds} rounds, bundles cached")
            results = coordinator.run()
    finally:
        for proc in processes:
            stop_process(proc, grace_s=20.0)
        run_store.close()
    wall = time.time() - started
    events = _read_timelines(timelines)
    agents_backbone = {a.agent_id: a.backbone for a in coordinator.agents.values()}
    breakdowns = [breakdown(times, events, agents_backbone) for times in coordinator.rounds if not times.abandoned]
    return {
        "rounds": rounds,
        "fleet": [{"agent": a, "memory_mb": m, "backbone": agents_backbone.get(a)} for a, m in fleet_caps],
        "cap_adjustments": adjusted,
        "refused": dict(coordinator.refused),
        "local_steps": config.local_steps,
        "wall_seconds": wall,
        "abandoned_rounds": sum(t.abandoned for t in coordinator.rounds),
        "bytes": [{"round": row.round, "agent": row.agent_id, "backbone": row.backbone, "up": row.bytes_up,
                   "down": row.bytes_down} for result in results for row in result.metrics],
        "updates_dir": str(out_dir / "run" / "updates"),
        "per_round": breakdowns,
        "coordinator_rounds": [t.to_dict() for t in coordinator.rounds],
    }


def demo_data_split() -> tuple[float, int, int]:
    """(Dirichlet alpha, global test samples per class, samples per agent) exactly as `coordinator demo`."""
    try:
        from coordinator.fleet import DataSplit
    except ImportError:  # before fleet files existed the demo hard-coded these
        return 0.3, 100, 600
    split = DataSplit(samples_per_agent=600)
    return split.alpha, split.global_test_per_class, split.samples_per_agent


def fleet_memory_caps(fleet: tuple[tuple[str, float], ...], bundles: dict[str, Any], memory_fraction: float
                      ) -> tuple[list[tuple[str, float]], list[str]]:
    """The demo fleet's memory caps, raised just enough where today's cost card no longer fits its backbone.

    The demo sizes its "Pi" caps so that only MiniLM-L3 fits. The cost card is re-measured at every export
    (and varies with machine load); if it grew past a Pi's cap the Pi would be refused and the fleet would
    not be the demo fleet any more. Then the cap is raised to the smallest value that admits MiniLM-L3 (and
    still refuses MiniLM-L6), and the change is reported.
    """
    def need(name: str) -> float | None:
        card = bundles[name].manifest.cost_card if name in bundles else None
        return None if card is None else card.peak_train_rss_mb / memory_fraction

    small, large = need("minilm-l3"), need("minilm-l6")
    caps, notes = [], []
    for agent_id, cap in fleet:
        if small is not None and cap < 1000 and cap < small and (large is None or small + 1 < large):
            new_cap = float(int(small) + 1)
            notes.append(f"{agent_id}: cap {cap:.0f} -> {new_cap:.0f} MB (MiniLM-L3 cost card needs "
                         f"{small * memory_fraction:.0f} MB = {memory_fraction:g} x {small:.0f} MB)")
            cap = new_cap
        caps.append((agent_id, cap))
    return caps, notes


def _read_timelines(folder: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.jsonl")):
        events += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return events


def _agent_round(events: list[dict[str, Any]], agent: str, round_id: int) -> dict[str, Any]:
    """The timestamps one agent recorded for one round."""
    mine = [e for e in events if e["agent"] == agent and e.get("round") == round_id]
    out: dict[str, Any] = {}
    for e in mine:
        kind = e["event"]
        if kind == "assignment":
            out["assignment"] = e["t"]
        elif kind == "fetch":
            out["fetch"] = (e["start"], e["t"], e["bytes"])
        elif kind == "start_round":
            out["start_round"] = e["t"] - e["start"]
        elif kind == "run_round":
            out["run_round"] = (e["start"], e["t"])
            out["train_s"], out["eval_s"], out["peak_rss_mb"] = e["train_s"], e["eval_s"], e["peak_rss_mb"]
        elif kind == "uploaded":
            out["uploaded"] = e["t"]
    return out


def breakdown(times: RoundTimes, events: list[dict[str, Any]], backbones: dict[str, str]) -> dict[str, Any]:
    """Lay one round's wall time out along its slowest agent's path; the parts sum to the wall time."""
    agents = {a: _agent_round(events, a, times.round_id) for a in times.finalize}
    complete = {a: r for a, r in agents.items() if {"assignment", "fetch", "run_round", "start_round"} <= set(r)}
    wall = times.end - times.start
    if not complete:
        return {"round": times.round_id, "wall_s": wall, "complete": False}
    slowest = max(complete, key=lambda a: complete[a]["train_s"] + complete[a]["eval_s"])
    c = complete[slowest]
    fin_start, fin_end = times.finalize[slowest]
    last_finalized = max(end for _, end in times.finalize.values())
    run_start, run_end = c["run_round"]
    _, fetch_end, fetch_bytes = c["fetch"]
    train_eval = c["train_s"] + c["eval_s"]
    inside_run = (run_end - run_start) - train_eval - c["start_round"]
    parts = {
        "weights_publish": times.weights_published - times.start,
        "assignment": c["assignment"] - times.weights_published,
        "download": fetch_end - c["assignment"],
        "device_setup": c["start_round"],
        "device_misc": (run_start - fetch_end) + inside_run,
        "upload": fin_start - run_end,
        "validation": fin_end - fin_start,
        "wait_others": last_finalized - fin_end,
        "close": times.aggregate[0] - last_finalized,
        "aggregation": times.aggregate[1] - times.aggregate[0],
        "commit": times.commit[1] - times.aggregate[1],
        "tail": times.end - times.commit[1],
    }
    overhead = wall - train_eval
    return {
        "round": times.round_id,
        "complete": True,
        "wall_s": wall,
        "slowest_agent": slowest,
        "slowest_backbone": backbones.get(slowest),
        "slowest_train_s": c["train_s"],
        "slowest_eval_s": c["eval_s"],
        "overhead_s": overhead,
        "overhead_fraction": overhead / wall,
        "parts_s": parts,
        "parts_sum_check_s": sum(parts.values()) + train_eval - wall,
        "weights_bytes": fetch_bytes,
        "device_setup_s_all": {a: r["start_round"] for a, r in complete.items()},
        "train_eval_s_all": {a: r["train_s"] + r["eval_s"] for a, r in complete.items()},
        "download_s_all": {a: r["fetch"][1] - r["fetch"][0] for a, r in complete.items()},
        "save_update_s": times.save_update_s,
        "scan_calls": times.scan_calls,
        "scan_seconds": times.scan_seconds,
    }


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Median over the steady-state rounds (round >= 2) of the overhead and of each part."""
    steady = [r for r in result["per_round"] if r.get("complete") and r["round"] >= 2] or \
        [r for r in result["per_round"] if r.get("complete")]
    return {
        "rounds_used": [r["round"] for r in steady],
        "wall_s": median(r["wall_s"] for r in steady),
        "train_eval_s": median(r["slowest_train_s"] + r["slowest_eval_s"] for r in steady),
        "overhead_s": median(r["overhead_s"] for r in steady),
        "overhead_fraction": median(r["overhead_fraction"] for r in steady),
        "parts_s": {k: median(r["parts_s"][k] for r in steady) for k, _ in PARTS},
    }


if __name__ == "__main__":
    from bench.common import DEFAULT_OUT, write_json

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    outcome = run(DEFAULT_OUT / "overhead", rounds=rounds)
    write_json(DEFAULT_OUT / "overhead.json", outcome)
    print(json.dumps(summarise(outcome), indent=2))
