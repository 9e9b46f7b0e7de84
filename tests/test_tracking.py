"""`coordinator run --tracking tensorboard:DIR` on a real run, read back from the event files it wrote.

One real federation (real mosquitto, three real `edge-agent join` processes on tiny backbones in two groups,
real ORT training, 2 rounds, plus the rogue device of tests/test_faults.py whose oversized updates are rejected,
and one agent killed when round 2 starts): the TensorBoard event files are parsed here with the protobuf
schema tensorboardX ships (TFRecord framing and CRCs checked), and every scalar is compared with numbers the
test recomputes itself from metrics.csv and the SQLite store. A second, smaller real run without --tracking
must leave no event file anywhere.
"""

from __future__ import annotations

import csv
import os
import sqlite3
import struct
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.observers import RoundEnded, RoundStarted, UpdateHandled
from coordinator.runner import run_federation
from coordinator.tracking import TrackingError, check_target, parse_tracking
from tests.harness import AgentProcesses, agent_processes, fleet_data
from tests.test_faults import RogueAgent, _huge

pytest.importorskip("tensorboardX", reason="the `tracking` extra (requirements/builder.txt) is not installed")

from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c

PINS = {"a1": "tiny-3", "a2": "tiny-6", "a3": "tiny-6", "rogue": "tiny-3"}
VICTIM = "a3"  # killed as soon as round 2's assignments are out: a real lost agent in round 2
GROUPS = ("tiny-3", "tiny-6")


@dataclass
class Killer:
    """Kills the victim when round 2 starts (a RoundObserver, like the tracker it runs beside)."""

    agents: AgentProcesses

    def round_started(self, event: RoundStarted) -> None:
        if event.round_id == 2 and VICTIM in event.selected:
            self.agents.kill(VICTIM)

    def update_handled(self, event: UpdateHandled) -> None:
        pass

    def round_ended(self, event: RoundEnded) -> None:
        pass


def _config(name: str, pins: dict[str, str], rounds: int) -> RunConfig:
    return RunConfig(run_name=name, backbones=tuple(sorted(set(pins.values()))), rounds=rounds, local_steps=3,
                     min_agents=len(pins), pinned=pins, task=TaskConfig(max_length=32, batch_size=8),
                     round_timeout_s=120, join_timeout_s=120, learning_rate=5e-3, min_fraction=0.5,
                     over_selection=1.0, max_update_norm=1e3)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tracking")
    data = fleet_data(tmp, [a for a in PINS if a != "rogue"])
    with MosquittoBroker(tmp / "broker") as broker, agent_processes(tmp, data) as agents:
        rogue = RogueAgent(broker, "rogue", _huge)

        def start(host: str, port: int) -> None:
            agents.start(host, port)
            rogue.thread.start()

        try:
            run_federation(_config("tracking", PINS, 2), tmp / "run", broker=broker.address, start_agents=start,
                           observers=[Killer(agents)], tracking=f"tensorboard:{tmp / 'tb'}")
        finally:
            rogue.stop.set()
            rogue.thread.join(10)
        agents.wait(60)
    return tmp / "run", tmp / "tb"


def read_events(path: Path) -> list[Event]:
    """A TFRecord file of Event protos: u64 length, masked CRC of it, the bytes, their masked CRC."""
    blob, events, at = path.read_bytes(), [], 0
    while at < len(blob):
        header = blob[at:at + 8]
        (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", blob[at + 8:at + 12])
        assert length_crc == masked_crc32c(header)
        data = blob[at + 12:at + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[at + 12 + length:at + 16 + length])
        assert data_crc == masked_crc32c(data)
        event = Event()
        event.ParseFromString(data)
        events.append(event)
        at += 16 + length
    return events


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for event in read_events(files[0]):
        for value in event.summary.value:
            assert event.step not in out[value.tag], (value.tag, event.step)  # one value per round and tag
            out[value.tag][event.step] = value.simple_value
    return dict(out)


def _pooled(rows: list[dict[str, str]], view: str) -> float:
    weight = "n_test" if view == "personal" else "n_global_test"
    pairs = [(float(r[f"{view}_accuracy"]), int(r[weight])) for r in rows if r[f"{view}_accuracy"]]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def test_scalars_are_the_runs_numbers(tracked_run: tuple[Path, Path]) -> None:
    run_dir, log_dir = tracked_run
    logged = scalars(log_dir)
    with open(run_dir / "metrics.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    db = sqlite3.connect(run_dir / "coordinator.sqlite")
    stored = {r: (s, f, n, a) for r, s, f, n, a in
              db.execute("SELECT round_id, started, finished, selected, accepted FROM rounds")}
    assert sorted(stored) == [1, 2]
    f32 = {"rel": 1e-6}  # event files hold float32
    for round_id, (started, finished, selected, accepted) in stored.items():
        rows = [r for r in csv_rows if int(r["round"]) == round_id]
        ok = [r for r in rows if r["accepted"] == "True"]
        for view in ("personal", "global"):
            for group in GROUPS:
                expected = _pooled([r for r in ok if r["backbone"] == group], view)
                assert logged[f"accuracy/{view}/{group}"][round_id] == pytest.approx(expected, **f32)
        declined = sum(r["reason"].startswith("declined:") for r in rows)
        assert logged["agents/selected"][round_id] == selected == 4
        assert logged["agents/accepted"][round_id] == accepted == len(ok)
        assert logged["agents/rejected"][round_id] == len(rows) - len(ok) - declined
        assert logged["agents/declined"][round_id] == declined
        assert logged["agents/no_report"][round_id] == selected - len(rows)
        assert logged["round/attempts"][round_id] == 1
        assert logged["round/seconds"][round_id] == pytest.approx(finished - started, **f32)
        assert logged["bytes/up"][round_id] == pytest.approx(sum(int(r["bytes_up"]) for r in rows), **f32)
        assert logged["bytes/down"][round_id] == pytest.approx(sum(int(r["bytes_down"]) for r in rows), **f32)
        split = sum(logged[f"round/{p}_seconds"][round_id] for p in ("publish", "wait", "aggregate", "commit"))
        assert split == pytest.approx(finished - started, rel=1e-5)
    # what this run really did: the rogue rejected in both rounds, the victim lost in round 2 and nowhere else
    assert logged["agents/accepted"] == {1: 3, 2: 2}
    assert logged["agents/rejected"] == {1: 1, 2: 1}
    assert logged["agents/lost"] == {1: 0, 2: 1}
    assert logged["agents/no_report"] == {1: 0, 2: 1}
    assert not list(run_dir.rglob("events.out.tfevents.*"))  # only where --tracking pointed


def test_bad_tracking_is_refused_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in ("foo:bar", "tensorboard", "tensorboard:", "mlflow:http://127.0.0.1:5000"):
        with pytest.raises(TrackingError, match="tensorboard:DIR"):
            parse_tracking(spec)
    with monkeypatch.context() as patch:  # as if the extra were not installed: importlib finds no tensorboardX
        patch.setitem(sys.modules, "tensorboardX", None)
        with pytest.raises(TrackingError, match=r"heterotune-edge\[tracking\]"):
            check_target(parse_tracking(f"tensorboard:{tmp_path / 'tb'}"))
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(TrackingError, match="cannot write to"):
        check_target(parse_tracking(f"tensorboard:{tmp_path / 'a-file' / 'tb'}"))
    with pytest.raises(TrackingError, match="cannot write to"):  # before any broker, bundle or run directory
        run_federation(_config("bad", {"a1": "tiny-3"}, 1), tmp_path / "run",
                       tracking=f"tensorboard:{tmp_path / 'a-file'}")
    assert not (tmp_path / "run").exists()
    config = Path(__file__).parents[1] / "configs" / "example.toml"
    for spec, says in (("foo:bar", "tensorboard:DIR"), (f"tensorboard:{tmp_path / 'a-file'}", "cannot write to")):
        bad = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", "--config", str(config), "--out",
                              str(tmp_path / "cli-run"), "--tracking", spec], capture_output=True, text=True,
                             env=os.environ, timeout=300)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "cli-run").exists()
    shown = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", "--help"], capture_output=True,
                           text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert shown.returncode == 0 and "--tracking" in shown.stdout and "tensorboard:DIR" in shown.stdout


def test_a_run_without_tracking_writes_no_event_files(tmp_path: Path) -> None:
    pins = {"b1": "tiny-3", "b2": "tiny-3"}
    default_dir = Path.cwd() / "runs"  # where tensorboardX writes when given no directory
    before = set(default_dir.rglob("events.out.tfevents.*"))
    data = fleet_data(tmp_path, list(pins))
    with MosquittoBroker(tmp_path / "broker") as broker, agent_processes(tmp_path, data) as agents:
        summary = run_federation(_config("untracked", pins, 1), tmp_path / "run", broker=broker.address,
                                 start_agents=agents.start)
        agents.wait(60)
    assert summary["rounds"] == 1 and not summary["stopped"]
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert set(default_dir.rglob("events.out.tfevents.*")) == before
