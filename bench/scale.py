"""Part 4: N synthetic agents against one mosquitto and the real coordinator, N = 10 ... 1,000.

Per fleet size: a fresh `coordinator.broker.MosquittoBroker` on a free loopback port, the coordinator in its
own process (`bench.scale_coordinator`: the real engine, tiny-3 bundle, heterotune), then the load generator
(`bench.loadgen`: up to 250 real paho clients per process, at most 4 processes) speaking the real protocol.
A sampler thread here reads CPU time and RSS of the broker, the coordinator and the generators from /proc.

Measured per round: completion time (the engine's own RoundResult.seconds) and time per agent, coordinator
CPU, aggregation and commit time, coordinator RSS before aggregation and at its peak, broker RSS.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, cpu_seconds, log, median, python_env, read_json, rss_mb, stop_process, write_json

AGENTS_PER_PROCESS = 250
MAX_PROCESSES = 4


class ProcessSampler:
    """Every `interval_s`: VmRSS and CPU seconds of named PIDs; keeps peaks and the last CPU reading."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval = interval_s
        self.pids: dict[str, int] = {}
        self.peak_rss: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.series: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sample()

    def _sample(self) -> None:
        now, snapshot = time.time(), {}
        for name, pid in list(self.pids.items()):
            rss = rss_mb(pid)
            if rss > 0:
                snapshot[name] = rss
                self.peak_rss[name] = max(self.peak_rss.get(name, 0.0), rss)
                self.cpu[name] = cpu_seconds(pid)
        self.series.append((now, snapshot))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def rss_at(self, name: str, when: float) -> float | None:
        """The last sampled RSS of `name` at or before `when`."""
        best = None
        for t, snapshot in self.series:
            if t > when:
                break
            best = snapshot.get(name, best)
        return best


def shapes_file(out_dir: Path) -> tuple[Path, Any]:
    """Tensor shapes of the tiny-3 bundle, read from its manifest on the builder side."""
    from bench.scale_coordinator import scale_config
    from coordinator.runner import build_bundles

    bundle = build_bundles(scale_config(1, 1))["tiny-3"]
    path = out_dir / "tiny-3-shapes.json"
    write_json(path, {t.name: list(t.shape) for t in bundle.manifest.tensors})
    return path, bundle


def run_one(agents: int, *, rounds: int, out_dir: Path, shapes: Path, time_limit_s: float,
            profile: bool = False) -> dict[str, Any]:
    from coordinator.broker import MosquittoBroker

    work = out_dir / f"n{agents}{'-profiled' if profile else ''}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    processes = min(MAX_PROCESSES, math.ceil(agents / AGENTS_PER_PROCESS)) if agents > 10 else 1
    processes = max(processes, 2) if agents >= 100 else processes
    sampler = ProcessSampler()
    generators: list[tuple[subprocess.Popen[str], Path]] = []
    coordinator: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"agents": agents, "processes": processes, "profiled": profile}
    deadline = time.monotonic() + time_limit_s
    try:
        with MosquittoBroker(work / "broker") as broker:
            assert broker.pid is not None
            sampler.watch("broker", broker.pid)
            sampler.start()
            ready = work / "coordinator.ready"
            with open(work / "coordinator.log", "wb") as coord_log:
                coordinator = subprocess.Popen(
                    [sys.executable, "-m", "bench.scale_coordinator", "--port", str(broker.port), "--agents",
                     str(agents), "--rounds", str(rounds), "--run-dir", str(work / "run"), "--out",
                     str(work / "coordinator.json"), "--ready", str(ready)] + (["--profile"] if profile else []),
                    cwd=REPO, env=python_env(1), stdout=coord_log, stderr=subprocess.STDOUT)
            sampler.watch("coordinator", coordinator.pid)
            while not ready.exists():
                if coordinator.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"coordinator did not come online; see {work / 'coordinator.log'}")
                time.sleep(0.05)
            ids = [f"s{i:04d}" for i in range(agents)]
            per = math.ceil(agents / processes)
            for p in range(processes):
                chunk = ids[p * per:(p + 1) * per]
                if not chunk:
                    continue
                out_path = work / f"loadgen-{p}.json"
                with open(out_path, "w") as out, open(work / f"loadgen-{p}.log", "wb") as err:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "bench.loadgen", "--port", str(broker.port), "--ids",
                         f"{chunk[0]}:{chunk[-1]}", "--shapes", str(shapes), "--time-limit",
                         str(int(max(10.0, deadline - time.monotonic()))), "--seed", str(p)],
                        cwd=REPO, env=python_env(1), stdout=out, stderr=err, text=True)
                generators.append((proc, out_path))
                sampler.watch(f"loadgen-{p}", proc.pid)
            coordinator.wait(max(1.0, deadline - time.monotonic()))
            for proc, _ in generators:
                proc.wait(max(1.0, min(30.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        result["error"] = f"time limit of {time_limit_s:.0f} s reached"
    except RuntimeError as exc:
        result["error"] = str(exc)
    finally:
        for proc, _ in generators:
            stop_process(proc, grace_s=1.0)
        if coordinator is not None:
            stop_process(coordinator, grace_s=1.0)
        sampler.stop()
    coord_path = work / "coordinator.json"
    coord = read_json(coord_path) if coord_path.exists() else {}
    gens = [read_json(path) for _, path in generators if path.exists() and path.stat().st_size]
    result.update(_summarise(agents, coord, gens, sampler))
    shutil.rmtree(work / "run" / "updates", ignore_errors=True)  # hundreds of MB of audit copies
    return result


def _summarise(agents: int, coord: dict[str, Any], gens: list[dict[str, Any]],
               sampler: ProcessSampler) -> dict[str, Any]:
    rounds = [r for r in coord.get("rounds", []) if not r.get("abandoned")]
    steady = rounds[1:] or rounds
    gen_cpu = sum(g.get("cpu_s", 0.0) for g in gens)
    out: dict[str, Any] = {
        "coordinator_error": coord.get("error", "no result"),
        "joined": coord.get("joined"),
        "loadgen_finished": sum(g.get("finished", 0) for g in gens),
        "loadgen_errors": sum(g.get("error_count", 0) for g in gens),
        "loadgen_error_samples": [e for g in gens for e in g.get("errors", [])][:5],
        "loadgen_disconnects": sum(g.get("disconnects", 0) for g in gens),
        "loadgen_cpu_s": gen_cpu,
        "loadgen_peak_rss_mb": max((g.get("peak_rss_mb", 0.0) for g in gens), default=None),
        "rounds": rounds,
        "abandoned": sum(bool(r.get("abandoned")) for r in coord.get("rounds", [])),
        "join_phase_s": (coord["last_join"] - coord["run_started"]) if coord.get("last_join") else None,
        "coordinator_peak_rss_mb": coord.get("peak_rss_mb"),
        "coordinator_rss_loaded_mb": coord.get("rss_after_imports_and_bundles_mb"),
        "coordinator_cpu_total_s": coord.get("cpu_total_s"),
        "scan_pass_s": coord.get("scan_pass_s"),
        "broker_peak_rss_mb": sampler.peak_rss.get("broker"),
        "broker_cpu_s": sampler.cpu.get("broker"),
        "update_bytes": coord.get("update_bytes"),
        "profile": coord.get("profile"),
    }
    if steady:
        first = rounds[0]
        out.update({
            "round_s": median(r["seconds"] for r in steady),
            "round_s_all": [r["seconds"] for r in rounds],
            "time_per_agent_ms": 1000 * median(r["seconds"] for r in steady) / agents,
            "coordinator_cpu_per_round_s": median(r["cpu_s"] for r in steady),
            "aggregate_s": median(r["aggregate_s"] for r in steady),
            "commit_s": median(r["commit_s"] for r in steady),
            "save_update_s": median(r["save_update_total_s"] for r in steady),
            "assignments_s": median(r["assignments_sent"] - r["weights_published"] for r in steady),
            "pumps_per_round": median(r["pumps"] for r in steady),
            "engine_thread_cpu_s": median(r["thread_cpu_s"].get("MainThread", 0.0) for r in steady),
            "network_thread_cpu_s": median(sum(v for k, v in r["thread_cpu_s"].items() if k.startswith("paho"))
                                           for r in steady),
            "rss_round_start_mb": first["rss_start_mb"],
            "rss_before_aggregate_mb": max(r["rss_before_aggregate_mb"] for r in rounds),
            "rss_round_peak_mb": max(r["rss_peak_mb"] for r in rounds),
            "broker_rss_in_rounds_mb": max((sampler.rss_at("broker", r["end"]) or 0.0) for r in rounds),
        })
        out["held_per_update_kb"] = 1024 * (out["rss_before_aggregate_mb"] - out["rss_round_start_mb"]) / agents
        if out["scan_pass_s"] is not None:
            out["scan_estimate_s"] = out["pumps_per_round"] * out["scan_pass_s"]
    return out


def run(sizes: list[int], *, rounds: int = 3, out_dir: Path, time_limit_s: float = 900.0,
        profile_size: int | None = None) -> dict[str, Any]:
    """Every fleet size in turn, then (optionally) one more run of `profile_size` agents with cProfile on."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes, bundle = shapes_file(out_dir)
    deadline = time.monotonic() + time_limit_s
    results = []
    for agents in sizes:
        remaining = deadline - time.monotonic()
        if remaining < 30:
            log(f"scale: time limit reached before N={agents}")
            break
        log(f"scale: N={agents}")
        results.append(run_one(agents, rounds=rounds, out_dir=out_dir, shapes=shapes,
                               time_limit_s=min(remaining, 120.0 + 1.0 * agents)))
        r = results[-1]
        problem = r.get("error") or r["coordinator_error"] or "none"
        log(f"scale: N={agents}: round {r.get('round_s', float('nan')):.2f} s, "
            f"{r.get('time_per_agent_ms', float('nan')):.2f} ms/agent, error: {problem}")
    profiled = None
    if profile_size is not None and deadline - time.monotonic() > 60:
        log(f"scale: N={profile_size} with cProfile on the coordinator's engine thread")
        profiled = run_one(profile_size, rounds=2, out_dir=out_dir, shapes=shapes, profile=True,
                           time_limit_s=min(deadline - time.monotonic(), 120.0 + 1.5 * profile_size))
    return {"rounds": rounds, "bundle_bytes": bundle.download_bytes(), "backbone": "tiny-3", "sizes": results,
            "agents_per_process": AGENTS_PER_PROCESS, "profiled": profiled}


if __name__ == "__main__":
    from bench.common import DEFAULT_OUT

    sizes = [int(x) for x in sys.argv[1:]] or [10, 100]
    outcome = run(sizes, rounds=3, out_dir=DEFAULT_OUT / "scale", profile_size=sizes[-1])
    write_json(DEFAULT_OUT / "scale_dev.json", outcome)
    for r in outcome["sizes"]:
        print({k: v for k, v in r.items() if k not in ("rounds",)})
