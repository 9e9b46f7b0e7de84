"""`coordinator report` on a real run, and the live progress the coordinator prints while it runs.

One real federation (real mosquitto, three real `edge-agent join` processes on tiny backbones, real ORT
training, 2 rounds): an observer counts every round event and kills one agent the moment round 2's
assignments are out, so round 2 has a real dropout. The report of that run directory is then checked against
numbers the test recomputes itself from metrics.csv and the SQLite store.
"""

from __future__ import annotations

import csv
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.observers import ProgressPrinter, RoundEnded, RoundStarted, UpdateHandled
from coordinator.run_report import ReportError, load_run, write_report
from coordinator.runner import run_federation
from tests.harness import AgentProcesses, agent_processes, fleet_data

PINS = {"a1": "tiny-3", "a2": "tiny-6", "a3": "tiny-6"}
VICTIM = "a3"  # killed as soon as round 2's assignments are out: a real dropout in round 2


@dataclass
class Recorder:
    """Counts the engine's events, feeds a real ProgressPrinter, and kills the victim at round 2's start."""

    agents: AgentProcesses | None = None
    events: list[RoundStarted | UpdateHandled | RoundEnded] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.printer = ProgressPrinter(self.lines.append)

    def round_started(self, event: RoundStarted) -> None:
        self.events.append(event)
        self.printer.round_started(event)
        if event.round_id == 2 and VICTIM in event.selected and self.agents is not None:
            self.agents.kill(VICTIM)

    def update_handled(self, event: UpdateHandled) -> None:
        self.events.append(event)
        self.printer.update_handled(event)

    def round_ended(self, event: RoundEnded) -> None:
        self.events.append(event)
        self.printer.round_ended(event)


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Recorder]:
    tmp = tmp_path_factory.mktemp("report")
    data = fleet_data(tmp, list(PINS))
    config = RunConfig(run_name="report", backbones=("tiny-3", "tiny-6"), rounds=2, local_steps=3, min_agents=3,
                       pinned=PINS, task=TaskConfig(max_length=32, batch_size=8), round_timeout_s=120,
                       join_timeout_s=120, learning_rate=5e-3, min_fraction=0.5, over_selection=1.0)
    recorder = Recorder()
    with MosquittoBroker(tmp / "broker") as broker, agent_processes(tmp, data) as agents:
        recorder.agents = agents
        run_federation(config, tmp / "run", broker=broker.address, start_agents=agents.start,
                       observers=[recorder])
        agents.wait(60)
    return tmp / "run", recorder


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _pooled(rows: list[dict[str, str]], view: str) -> float | None:
    """Sample-weighted accuracy over agents, recomputed here from the CSV's own columns."""
    weight = "n_test" if view == "personal" else "n_global_test"
    pairs = [(float(r[f"{view}_accuracy"]), int(r[weight])) for r in rows if r[f"{view}_accuracy"] not in ("", None)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def test_progress_events_match_the_store(watched_run: tuple[Path, Recorder]) -> None:
    run_dir, recorder = watched_run
    started = [e for e in recorder.events if isinstance(e, RoundStarted)]
    ended = [e for e in recorder.events if isinstance(e, RoundEnded)]
    handled = [e for e in recorder.events if isinstance(e, UpdateHandled)]
    assert [e.round_id for e in started] == [1, 2] and [e.attempt for e in started] == [0, 0]
    assert [(e.round_id, e.committed) for e in ended] == [(1, True), (2, True)]
    assert all(len(e.selected) == 3 for e in started)
    db = sqlite3.connect(run_dir / "coordinator.sqlite")
    stored = dict(db.execute("SELECT round_id, accepted FROM rounds").fetchall())
    assert {e.round_id: e.accepted for e in ended} == stored == {1: 3, 2: 2}
    outcomes = Counter((e.round_id, e.outcome) for e in handled)
    assert outcomes == {(1, "accepted"): 3, (2, "accepted"): 2, (2, "lost"): 1}
    assert [e.agent_id for e in handled if e.outcome == "lost"] == [VICTIM]
    # the printer wrote one line per event, and its last line of round 2 says who was lost
    assert len(recorder.lines) == len(recorder.events)
    assert any(f"{VICTIM} lost" in line and "reported 2/3" in line for line in recorder.lines)
    assert all("s left" in line for line in recorder.lines if not line.endswith(" s"))


def test_report_writes_plots_and_a_page_with_the_stores_numbers(watched_run: tuple[Path, Recorder],
                                                                 tmp_path: Path) -> None:
    run_dir, _ = watched_run
    written = write_report(run_dir, tmp_path / "report")
    pngs = [p for p in written if p.suffix == ".png"]
    assert {p.stem for p in pngs} == {"accuracy", "bytes", "round-time", "outcomes"}
    for png in pngs:
        blob = png.read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000, png
    page = (tmp_path / "report" / "report.md").read_text()
    for png in pngs:
        assert f"]({png.name})" in page

    rows = _csv_rows(run_dir)
    db = sqlite3.connect(run_dir / "coordinator.sqlite")
    table = {int(line.split("|")[1]): [c.strip() for c in line.split("|")[1:-1]]
             for line in page.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert sorted(table) == [1, 2]
    header = next(line for line in page.splitlines() if line.startswith("| round |"))
    columns = [c.strip() for c in header.split("|")[1:-1]]
    for round_id, selected, finished_minus_started in db.execute(
            "SELECT round_id, selected, finished - started FROM rounds"):
        cells = dict(zip(columns, table[round_id], strict=True))
        in_round = [r for r in rows if int(r["round"]) == round_id]
        accepted = sum(r["accepted"] == "True" for r in in_round)
        assert int(cells["selected"]) == selected == 3
        assert int(cells["accepted"]) == accepted
        assert int(cells["reported"]) == len(in_round)
        assert int(cells["no report"]) == selected - len(in_round) == (1 if round_id == 2 else 0)
        assert cells["up KB"] == f"{sum(int(r['bytes_up']) for r in in_round) / 1024:.0f}"
        assert cells["down KB"] == f"{sum(int(r['bytes_down']) for r in in_round) / 1024:.0f}"
        assert cells["round s"] == f"{finished_minus_started:.1f}"
        for backbone in sorted(set(PINS.values())):
            group = [r for r in in_round if r["backbone"] == backbone]
            for view in ("personal", "global"):
                value = _pooled(group, view)
                assert cells[f"{backbone} {view} %"] == ("-" if value is None else f"{100 * value:.1f}")


def test_report_of_a_directory_without_a_run_says_what_is_wrong(watched_run: tuple[Path, Recorder],
                                                                tmp_path: Path) -> None:
    run_dir, _ = watched_run
    with pytest.raises(ReportError, match="not a run directory"):
        load_run(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "coordinator.sqlite").write_bytes((run_dir / "coordinator.sqlite").read_bytes())
    with pytest.raises(ReportError, match=r"metrics\.csv"):
        load_run(broken)  # the run never finished writing its files
    (broken / "metrics.csv").write_text("round,agent_id\n1,a1\n")
    with pytest.raises(ReportError, match=r"metrics\.csv.*column"):
        load_run(broken)
    (broken / "metrics.csv").write_text((run_dir / "metrics.csv").read_text().replace(",tiny-3,", ",tiny-3,oops,"))
    with pytest.raises(ReportError, match=r"metrics\.csv"):
        load_run(broken)
    (broken / "metrics.csv").write_text((run_dir / "metrics.csv").read_text())
    (broken / "coordinator.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ReportError, match=r"coordinator\.sqlite"):
        load_run(broken)


def test_report_command_exit_codes(watched_run: tuple[Path, Recorder], tmp_path: Path) -> None:
    run_dir, _ = watched_run
    env = {**os.environ, "MPLBACKEND": "Agg"}
    ok = subprocess.run([sys.executable, "-m", "coordinator.cli", "report", str(run_dir), "--out",
                         str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "report.md").exists() and str(tmp_path / "out" / "report.md") in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "coordinator.cli", "report", str(tmp_path / "nothing")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr and "Traceback" not in bad.stderr
