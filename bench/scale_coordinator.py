"""The real coordinator for the scale benchmark, in its own process so its CPU and RSS are its own.

    python -m bench.scale_coordinator --port PORT --agents N --rounds R --run-dir DIR --out RESULT.json

`coordinator.engine.Coordinator` (through `TimedCoordinator`, whose hooks run O(1) or O(messages) times
per round) with the tiny-3 bundle, the heterotune method and every agent in every round. Writes a ready
marker once it is online (agents must not join before it listens) and, at the end, one JSON result.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, peak_rss_mb, rss_mb, write_json
from bench.timed_coordinator import RssSampler, TimedCoordinator, TimedRunStore


class ScaleCoordinator(TimedCoordinator):
    ready_file: Path | None = None
    profiler: cProfile.Profile | None = None  # enabled only while a round runs

    def _run_round(self, round_id: int, *args: Any, **kwargs: Any) -> Any:
        before = thread_cpu()
        if self.profiler is not None:
            self.profiler.enable()
        try:
            return super()._run_round(round_id, *args, **kwargs)
        finally:
            if self.profiler is not None:
                self.profiler.disable()
            after = thread_cpu()
            self.rounds[-1].thread_cpu_s = {name: after[name] - before.get(name, 0.0) for name in after}

    def _announce(self, state: str, *args: Any, **kwargs: Any) -> None:
        super()._announce(state, *args, **kwargs)
        if state == "online" and self.ready_file is not None:
            self.ready_file.write_text(str(time.time()))


def scale_config(agents: int, rounds: int) -> Any:
    from coordinator.config import RunConfig

    fields: dict[str, Any] = {
        "run_name": f"scale-{agents}", "method": "heterotune", "backbones": ("tiny-3",), "rounds": rounds,
        "local_steps": 1, "min_agents": agents, "join_timeout_s": 60.0 + 0.1 * agents,
        "round_timeout_s": 60.0 + 0.2 * agents,
    }
    if "max_round_attempts" in RunConfig.model_fields:
        fields["max_round_attempts"] = 1  # a round that misses an update is a failure here, not a retry
    return RunConfig(**fields)


def _summarise_round(times: Any, agents: int) -> dict[str, Any]:
    data = times.to_dict()
    reports = sorted(data.pop("reports").values())
    saved = sorted(data.pop("saved").values())
    save_s = list(data.pop("save_update_s").values())
    data.pop("last_chunk")
    data.pop("finalize")
    data.update({
        "reports_received": len(reports),
        "first_report": reports[0] if reports else None,
        "last_report": reports[-1] if reports else None,
        "last_saved": saved[-1] if saved else None,
        "save_update_total_s": sum(save_s),
        "time_per_agent_s": (times.end - times.start) / max(1, agents),
        "aggregate_s": times.aggregate[1] - times.aggregate[0],
        "commit_s": times.commit[1] - times.commit[0],
        "cpu_s": times.cpu_end - times.cpu_start,
    })
    return data


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each live Python thread of this process by its name (engine = MainThread, paho's
    network thread = paho-mqtt-client-coordinator), read from /proc/self/task/TID/stat."""
    out: dict[str, float] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for thread in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, TypeError):
            continue
        out[thread.name] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def top_functions(profiler: cProfile.Profile, limit: int = 14) -> list[dict[str, Any]]:
    """The engine thread's most expensive functions by their own (not cumulative) time."""
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, func), (_cc, calls, own, cumulative, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(path).name}:{line}({func})", "calls": calls, "own_s": own,
                     "cumulative_s": cumulative})
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return rows[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--profile", action="store_true", help="cProfile the engine thread (slows it down)")
    args = parser.parse_args()

    from coordinator.engine import Coordinator
    from coordinator.runner import build_bundles

    started = time.time()
    config = scale_config(args.agents, args.rounds)
    bundles = build_bundles(config)
    rss_loaded = rss_mb()
    store = TimedRunStore(args.run_dir)
    sampler = RssSampler(0.05)
    sampler.start()
    coordinator = ScaleCoordinator(config, bundles, Coordinator.endpoint_for("127.0.0.1", args.port), store,
                                   sampler=sampler)
    coordinator.ready_file = args.ready
    error = ""
    profiler = cProfile.Profile() if args.profile else None
    coordinator.profiler = profiler
    try:
        coordinator.run()
    except Exception as exc:  # reported in the result; the parent decides what it means
        error = f"{type(exc).__name__}: {exc}"
    finally:
        sampler.stop()
        store.close()
    try:
        scan_pass: float | None = coordinator.scan_cost(args.agents)
    except Exception as exc:  # the engine's internals move; the estimate is optional
        scan_pass, error = None, error or f"scan estimate failed: {exc}"
    joined = sorted(coordinator.joined_at.values())
    first_round = coordinator.rounds[0].start if coordinator.rounds else None
    write_json(args.out, {
        "agents": args.agents,
        "joined": len(coordinator.agents),
        "refused": len(coordinator.refused),
        "error": error,
        "process_start": started,
        "run_started": coordinator.run_started,
        "last_join": joined[-1] if joined else None,
        "first_round_start": first_round,
        "rss_after_imports_and_bundles_mb": rss_loaded,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_total_s": cpu_seconds(),
        "profile": top_functions(profiler) if profiler is not None else None,
        "scan_pass_s": scan_pass,
        "rounds": [_summarise_round(t, args.agents) for t in coordinator.rounds],
        "update_bytes": bundles["tiny-3"].manifest.cost_card.payload_bytes
        if bundles["tiny-3"].manifest.cost_card else None,
    })


if __name__ == "__main__":
    main()
