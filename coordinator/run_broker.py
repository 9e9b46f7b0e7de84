"""The broker a run uses, recorded in its run directory so that `coordinator run --resume RUN_DIR` finds it again.

A new run either uses the broker it is given (``--broker HOST:PORT``, or ``HOST:PORT,HOST:PORT...`` for the nodes
of a cluster: the coordinator fails over between them, docs/deployment.md) or starts its own mosquitto (persistence on)
and records address, config file and PID in ``RUN_DIR/broker/broker.json``. A resume reuses that broker:

- still running (the coordinator was killed, its broker kept serving the agents): adopted, and stopped by PID
  when the resumed run ends;
- dead: restarted from the very same config file (same address; never rewritten), its persistence
  directory bringing back sessions and retained state;
- an external broker: the recorded address, unless ``--broker`` names another.

The broker this process starts or adopts is stopped on every exit that runs Python code (normal end, error,
Ctrl-C, SIGTERM: the CLI turns SIGTERM into SystemExit). Only kill -9 of the coordinator leaves it running, on
purpose: the agents stay connected and the resume adopts it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from coordinator.broker import (
    ConfiguredMosquitto,
    MosquittoBroker,
    is_loopback,
    mosquitto_pid_running,
    stop_pid,
)
from protocols.brokers import BrokerAddress, parse_broker_address, parse_broker_list
from protocols.durable import write_atomic

log = logging.getLogger("coordinator")

RECORD_FILE = "broker.json"


class InsecureBrokerRefused(ValueError):
    """An own broker reachable from other hosts would accept anyone; refused without --insecure."""


class NoRecordedBroker(FileNotFoundError):
    """A resume found no broker recorded in the run directory and was given none."""


@dataclass(frozen=True)
class BrokerRecord:
    embedded: bool  # True: this run's own mosquitto (started, adopted or restarted by the coordinator)
    host: str
    port: int
    pid: int | None = None
    config: str | None = None  # the embedded broker's mosquitto.conf
    unauthenticated_network: bool = False  # embedded, anonymous and reachable from other hosts (--insecure)
    failover: tuple[str, ...] = ()  # further nodes of an external cluster (--broker A,B,...), tried in order

    @property
    def failover_brokers(self) -> tuple[BrokerAddress, ...]:
        return tuple(parse_broker_address(a) for a in self.failover)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def save_record(broker_dir: Path, record: BrokerRecord) -> None:
    """Atomic (protocols/durable.py): a crash never leaves a half-written record to resume from."""
    broker_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(broker_dir / RECORD_FILE, json.dumps(asdict(record), indent=2).encode("utf-8"))


def load_record(broker_dir: Path) -> BrokerRecord | None:
    path = broker_dir / RECORD_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        record = BrokerRecord(embedded=bool(raw["embedded"]), host=str(raw["host"]), port=int(raw["port"]),
                              pid=None if raw.get("pid") is None else int(raw["pid"]),
                              config=None if raw.get("config") is None else str(raw["config"]),
                              unauthenticated_network=bool(raw.get("unauthenticated_network", False)),
                              failover=tuple(str(parse_broker_address(str(a))) for a in raw.get("failover", [])))
    except (ValueError, KeyError, TypeError) as exc:
        raise NoRecordedBroker(f"{path} is damaged ({exc}); give the broker with --broker HOST:PORT") from None
    return record


def check_listen(listen: str, insecure: bool) -> None:
    """Refuse (before anything is written) an own broker that anyone on the network could use without a password."""
    if not is_loopback(listen) and not insecure:
        raise InsecureBrokerRefused(
            f"an own broker listening on {listen} would let anyone on the network read and steer the run (it has "
            "no passwords); provision a secured one (`coordinator provision`, then `mosquitto -c "
            "DIR/broker/mosquitto.conf` and `coordinator run --broker ...`), or pass --insecure to accept that")


@contextlib.contextmanager
def run_broker(broker_dir: Path, *, address: str | None, resume: bool, listen: str = "127.0.0.1",
               insecure: bool = False) -> Iterator[BrokerRecord]:
    """The run's broker for the duration of the block (see the module docstring for the cases)."""
    try:
        recorded = load_record(broker_dir) if resume else None
    except NoRecordedBroker:
        if not address:
            raise
        recorded = None  # a damaged record does not matter when the broker is given
    if address:
        first, *others = parse_broker_list(address)
        host, port = first.host, first.port
        if recorded is not None and recorded.embedded and (recorded.host, recorded.port) == (host, port):
            with _resumed_embedded(broker_dir, recorded) as record:  # --broker named the run's own broker
                yield record
            return
        if recorded is not None and recorded.embedded and recorded.pid is not None and recorded.config \
                and mosquitto_pid_running(recorded.pid, Path(recorded.config)):
            log.warning("the run's own broker %s (pid %d) is still running but --broker names %s; it is left "
                        "running for its agents: stop it with kill %d", recorded.address, recorded.pid, address,
                        recorded.pid)
        record = BrokerRecord(embedded=False, host=host, port=port, failover=tuple(str(a) for a in others))
        save_record(broker_dir, record)
        yield record
        return
    if resume:
        if recorded is None:
            raise NoRecordedBroker(f"{broker_dir.parent} records no broker ({broker_dir / RECORD_FILE} is missing); "
                                   "give the one the agents use with --broker HOST:PORT")
        if not recorded.embedded:
            yield recorded
            return
        with _resumed_embedded(broker_dir, recorded) as record:
            yield record
        return
    check_listen(listen, insecure)
    broker = MosquittoBroker(broker_dir, host=listen, persistence=True)
    broker.start()
    try:
        record = BrokerRecord(embedded=True, host=broker.host, port=broker.port, pid=broker.pid,
                              config=str(broker.config_path.resolve()),
                              unauthenticated_network=not is_loopback(listen))
        save_record(broker_dir, record)
        yield record
    finally:
        broker.stop()


@contextlib.contextmanager
def _resumed_embedded(broker_dir: Path, recorded: BrokerRecord) -> Iterator[BrokerRecord]:
    config = Path(recorded.config or broker_dir / "mosquitto.conf")
    if not config.exists():
        raise NoRecordedBroker(f"the run's broker config {config} is gone; give a broker with --broker HOST:PORT")
    if recorded.pid is not None and mosquitto_pid_running(recorded.pid, config):
        log.info("reusing the run's broker %s (pid %d, still running)", recorded.address, recorded.pid)
        try:
            yield recorded
        finally:
            stop_pid(recorded.pid, config)
        return
    log.info("the run's broker %s is not running; restarting it from %s", recorded.address, config)
    with ConfiguredMosquitto(config, recorded.host, recorded.port) as broker:
        record = BrokerRecord(**{**asdict(recorded), "pid": broker.pid})
        save_record(broker_dir, record)
        yield record
