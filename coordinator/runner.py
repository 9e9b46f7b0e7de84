"""Run one federation end to end: bundles, broker, coordinator, and the files a run leaves behind."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from coordinator.broker import MosquittoBroker, parse_broker_address
from coordinator.config import RunConfig
from coordinator.engine import Coordinator, RoundResult
from coordinator.federation_state import payload_bytes
from coordinator.report import final_overview, print_round, rounds_overview, write_metrics_csv, write_summary
from coordinator.store import STORE_FILE, RunStore
from export.bundle import Bundle, BundleRecipe, TaskSpec, build_bundle
from export.dema import DemaConfig

log = logging.getLogger("coordinator")


def build_bundles(config: RunConfig) -> dict[str, Bundle]:
    """One bundle per catalogued backbone of the run (reused when its recipe was built before)."""
    task = TaskSpec(config.task.name, config.task.labels, config.task.max_length, config.task.batch_size)
    dema = DemaConfig(**config.dema.model_dump())
    return {name: build_bundle(BundleRecipe(name, task, dema)) for name in config.backbones}


@contextlib.contextmanager
def broker_for(address: str | None, workdir: Path) -> Iterator[tuple[str, int]]:
    """The given broker, or (the embedded default) our own mosquitto on a free loopback port."""
    if address:
        yield parse_broker_address(address)
        return
    with MosquittoBroker(workdir) as broker:
        yield broker.host, broker.port


def resume_config(run_dir: Path) -> RunConfig:
    """The configuration a run directory was started with (stored in its database)."""
    if not (run_dir / "coordinator.sqlite").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no coordinator.sqlite); nothing to resume")
    store = RunStore(run_dir)
    try:
        raw = store.meta("config")
    finally:
        store.close()
    if raw is None:
        raise ValueError(f"{run_dir} has no stored configuration; it was never started")
    return RunConfig.model_validate(raw)


class RunDirectoryInUse(RuntimeError):
    """A new run was pointed at a directory that already holds one; nothing in it was changed."""


def stored_run(run_dir: Path) -> tuple[str, int] | None:
    """(run id, last committed round) of the run a directory already holds, or None if it holds none.

    Why it matters: the engine continues from a store's last committed round, so a *new* run in an old run's
    directory used to skip every round and report the old run's metrics as its own (a re-run of
    bench.memory_prediction printed the previous run's peaks that way).
    """
    if not (run_dir / STORE_FILE).exists():
        return None
    store = RunStore(run_dir)
    try:
        run_id, config, last = store.meta("run_id"), store.meta("config"), store.last_round()
    finally:
        store.close()
    if run_id is None and config is None and last == 0:
        return None
    return str(run_id or "(not started)"), last


def set_aside(run_dir: Path) -> Path | None:
    """Move a run a directory holds to a sibling named after its run id, so a new run can use the directory
    and the old one is kept. Returns where it went, or None if there was nothing to move."""
    held = stored_run(run_dir)
    if held is None:
        return None
    target = run_dir.with_name(f"{run_dir.name}-{held[0]}")
    if target.exists():
        target = run_dir.with_name(f"{run_dir.name}-{held[0]}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(target)
    return target


def run_federation(config: RunConfig, run_dir: Path, *, broker: str | None = None,
                   start_agents: Callable[[str, int], Any] | None = None,
                   console: Console | None = None, resume: bool = False,
                   mqtt_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build bundles, start (or use) a broker, run every round, and write metrics.csv + summary.json.

    With ``resume`` the run directory's last committed round is the starting point (after a crash)."""
    console = console or Console(stderr=True, width=None if Console(stderr=True).is_terminal else 120)
    held = None if resume else stored_run(run_dir)
    if held is not None:
        run_id, last = held
        raise RunDirectoryInUse(
            f"{run_dir} already holds run {run_id} (rounds committed: {last}); continue it with "
            f"`coordinator run --resume {run_dir}`, or give the new run another directory (--out). "
            "Nothing in it was changed.")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    bundles = build_bundles(config)
    store = RunStore(run_dir)
    if not resume:
        store.set_meta("config", config.model_dump(mode="json"))
    try:
        with broker_for(broker, run_dir / "broker") as (host, port):
            console.print(f"[bold]coordinator[/] broker {host}:{port}, method {config.method}, "
                          f"{config.rounds} rounds, backbones {', '.join(config.backbones)}")

            def show(result: RoundResult) -> None:
                print_round(console, result.round_id, result.metrics, result.seconds)

            make = Coordinator.resume if resume else Coordinator
            endpoint = Coordinator.endpoint_for(host, port, **(mqtt_options or {}))
            coordinator = make(config, bundles, endpoint, store, on_round=show)
            if start_agents is not None:
                start_agents(host, port)
            results = coordinator.run()
            if coordinator.final is not None:
                print_round(console, coordinator.final.round_id, coordinator.final.metrics,
                            coordinator.final.seconds, title="final model (after the last round)")
        rows = store.metrics()
        write_metrics_csv(run_dir / "metrics.csv", rows)
        summary = {
            "run_id": coordinator.run_id,
            "method": config.method,
            "rounds": len(results),
            "agents": {a.agent_id: a.backbone for a in coordinator.agents.values()},
            "refused": coordinator.refused,
            "bundle_bytes": {name: b.size for name, b in bundles.items()},
            "payload_bytes_per_round": {name: payload_bytes(bundles[name].manifest, coordinator.upload_names(name),
                                                               public_samples=coordinator.public_samples,
                                                               public_kind=coordinator.public_kind)
                                        for name in bundles},
            "wall_seconds": time.time() - started,
            "per_round": rounds_overview(rows),
            "final": final_overview(coordinator.final.metrics if coordinator.final else []),
        }
        write_summary(run_dir / "summary.json", summary)
        return summary
    finally:
        store.close()
