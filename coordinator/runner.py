"""Run one federation end to end: bundles, broker, coordinator, and the files a run leaves behind."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from coordinator.admission import AdmissionPolicy
from coordinator.config import RunConfig
from coordinator.engine import Coordinator, RoundResult
from coordinator.federation_state import payload_bytes
from coordinator.methods import scopes_for
from coordinator.observers import ProgressPrinter, RoundObserver
from coordinator.report import final_overview, print_round, rounds_overview, write_metrics_csv, write_summary
from coordinator.run_broker import check_listen, run_broker
from coordinator.store import STORE_FILE, RunStore
from coordinator.tracking import TensorBoardTracker, check_target, open_tracker, parse_tracking
from export.bundle import Bundle, BundleRecipe, TaskSpec, build_bundle
from export.dema import DemaConfig
from export.dema.config import shared_local_families
from protocols.signing import ensure_key_pair, public_path

log = logging.getLogger("coordinator")


def build_bundles(config: RunConfig) -> dict[str, Bundle]:
    """One bundle per catalogued backbone of the run (reused when its recipe was built before)."""
    task = TaskSpec(config.task.name, config.task.labels, config.task.max_length, config.task.batch_size)
    dema = DemaConfig(**config.dema.model_dump())
    shared = shared_local_families(scopes_for(config.method, config.scopes))
    return {name: build_bundle(BundleRecipe(name, task, dema, shared)) for name in config.backbones}


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


CONNECTION_META = "connection"  # non-secret MQTT options of a run, so that a resume needs only --resume RUN_DIR
_STORED_OPTIONS = ("username", "password_file", "tls_ca", "tls_cert", "tls_key")


def connection_options(store: RunStore, given: dict[str, Any] | None, *, resume: bool) -> dict[str, Any]:
    """The MQTT client options of this run: on a resume the stored ones, overridden by any given again.

    Passwords are never stored: a password file's path is, a password from the environment must be set again."""
    from protocols.credentials import resolve_password

    given = {k: v for k, v in (given or {}).items() if v is not None}
    stored = (store.meta(CONNECTION_META) or {}) if resume else {}
    options = {**{k: v for k, v in stored.items() if k in _STORED_OPTIONS and v is not None}, **given}
    store.set_meta(CONNECTION_META, {k: str(options[k] if k == "username" else Path(options[k]).resolve())
                                     for k in _STORED_OPTIONS if k in options})  # paths: resumable from any cwd
    password_file = options.pop("password_file", None)
    options["password"] = resolve_password(options.get("password"), Path(password_file) if password_file else None)
    return {k: (str(v) if k in ("tls_ca", "tls_cert", "tls_key") else v) for k, v in options.items()}


def run_key_path(run_dir: Path) -> Path:
    """Where a run keeps the key it signs control messages with (generated on first use, kept for resumes);
    agents get the public half, ``run_key_path(run_dir)`` + ``.pub``."""
    return run_dir / "keys" / "run-key"


def run_federation(config: RunConfig, run_dir: Path, *, broker: str | None = None,
                   start_agents: Callable[[str, int], Any] | None = None,
                   console: Console | None = None, resume: bool = False,
                   mqtt_options: dict[str, Any] | None = None, listen: str = "127.0.0.1",
                   insecure: bool = False, signing_key: Path | None = None,
                   join_token: bytes | None = None, observers: Sequence[RoundObserver] = (),
                   tracking: str | None = None) -> dict[str, Any]:
    """Build bundles, start (or use) a broker, run every round, and write metrics.csv + summary.json.

    With ``resume`` the run directory's last committed round is the starting point (after a crash), and the
    broker is the one the run recorded (coordinator/run_broker.py) unless ``broker`` names another.
    ``listen`` is where an own broker listens: loopback unless ``insecure`` (it has no passwords). Control
    messages are signed with ``signing_key`` (e.g. from `coordinator provision`), else with a key generated into
    the run directory (``run_key_path``) before any agent is started. The console gets a progress line per round
    event; ``observers`` see the same events (coordinator/observers.py). ``tracking`` (``tensorboard:DIR``, off
    when None) logs every committed round's scalars (coordinator/tracking.py); it is checked before anything
    starts."""
    console = console or Console(stderr=True, width=None if Console(stderr=True).is_terminal else 120)
    if broker is None and not resume:
        check_listen(listen, insecure)
    target = parse_tracking(tracking) if tracking is not None else None
    if target is not None:
        check_target(target)  # a bad spec, a missing library or an unwritable directory: now, not mid-run
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
    tracker: TensorBoardTracker | None = None
    try:
        if target is not None:
            tracker = open_tracker(target, run_dir)
            observers = [*observers, tracker]
        options = connection_options(store, mqtt_options, resume=resume)
        if signing_key is None and resume and store.meta("signing_key"):
            signing_key = Path(store.meta("signing_key"))  # a resumed run signs with the key its agents know
        key_path = signing_key or run_key_path(run_dir)
        key = ensure_key_pair(key_path)
        store.set_meta("signing_key", str(key_path.resolve()))
        with run_broker(run_dir / "broker", address=broker, resume=resume, listen=listen,
                        insecure=insecure) as record:
            host, port = record.host, record.port
            brokers = ",".join((record.address, *record.failover))
            console.print(f"[bold]coordinator[/] broker {brokers}, method {config.method}, "
                          f"{config.rounds} rounds, backbones {', '.join(config.backbones)}; agents verify with "
                          f"--coordinator-key {public_path(key_path)}")

            if record.unauthenticated_network:
                log.warning("INSECURE: this run's broker %s accepts anyone on the network without a password "
                            "(started with --insecure)", record.address)

            def show(result: RoundResult) -> None:
                print_round(console, result.round_id, result.metrics, result.seconds)
                if record.unauthenticated_network:
                    log.warning("INSECURE: this run's broker %s accepts anyone on the network without a password; "
                                "anyone can read and steer the run (started with --insecure)", record.address)

            make = Coordinator.resume if resume else Coordinator
            endpoint = Coordinator.endpoint_for(host, port, failover=record.failover_brokers, **options)
            admission = AdmissionPolicy(frozenset(config.allowed_agents) if config.allowed_agents is not None
                                        else None, join_token)
            progress = ProgressPrinter(lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
            coordinator = make(config, bundles, endpoint, store, on_round=show, signing_key=key, admission=admission,
                               observers=[progress, *observers])
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
            "rounds": store.last_round(),  # all committed rounds, also those before a resume
            "rounds_this_session": len(results),
            "stopped": coordinator.stopped,
            "agents": {a.agent_id: a.backbone for a in coordinator.agents.values()},
            "refused": coordinator.refused,
            "bundle_bytes": {name: b.download_bytes() for name, b in bundles.items()},  # an ORT device's download
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
        if tracker is not None:
            tracker.close()
