"""`coordinator report` on a real run, and the live progress the coordinator prints while it runs.

One real federation (real mosquitto, three real `edge-agent join` processes on tiny backbones, real ORT
training, 2 rounds, plus the rogue device of tests/test_faults.py whose oversized updates the coordinator
rejects): an observer counts every round event and kills one agent the moment round 2's assignments are out,
so round 2 has a real dropout and both rounds a real rejection. The report of that run directory is then checked against
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
from PIL import Image

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.observers import ObserverSet, ProgressPrinter, RoundEnded, RoundStarted, UpdateHandled
from coordinator.run_report import (
    ReportError,
    RunRecords,
    StoredRound,
    load_run,
    markdown_page,
    round_series,
    write_report,
)
from coordinator.runner import run_federation
from coordinator.store import MetricRow
from tests.harness import AgentProcesses, agent_processes, fleet_data
from tests.test_faults import RogueAgent, _huge

PINS = {"a1": "tiny-3", "a2": "tiny-6", "a3": "tiny-6", "rogue": "tiny-3"}
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
    data = fleet_data(tmp, [a for a in PINS if a != "rogue"])
    config = RunConfig(run_name="report", backbones=("tiny-3", "tiny-6"), rounds=2, local_steps=3, min_agents=4,
                       pinned=PINS, task=TaskConfig(max_length=32, batch_size=8), round_timeout_s=120,
                       join_timeout_s=120, learning_rate=5e-3, min_fraction=0.5, over_selection=1.0,
                       max_update_norm=1e3)
    recorder = Recorder()
    with MosquittoBroker(tmp / "broker") as broker, agent_processes(tmp, data) as agents:
        recorder.agents = agents
        rogue = RogueAgent(broker, "rogue", _huge)

        def start(host: str, port: int) -> None:
            agents.start(host, port)
            rogue.thread.start()  # it joins once the coordinator announces itself

        try:
            run_federation(config, tmp / "run", broker=broker.address, start_agents=start, observers=[recorder])
        finally:
            rogue.stop.set()
            rogue.thread.join(10)
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
    assert all(len(e.selected) == 4 for e in started)
    db = sqlite3.connect(run_dir / "coordinator.sqlite")
    stored = dict(db.execute("SELECT round_id, accepted FROM rounds").fetchall())
    assert {e.round_id: e.accepted for e in ended} == stored == {1: 3, 2: 2}
    outcomes = Counter((e.round_id, e.outcome) for e in handled)
    assert outcomes == {(1, "accepted"): 3, (1, "rejected"): 1, (2, "accepted"): 2, (2, "rejected"): 1,
                        (2, "lost"): 1}
    assert [e.agent_id for e in handled if e.outcome == "lost"] == [VICTIM]
    assert all(e.agent_id == "rogue" and "norm" in e.reason for e in handled if e.outcome == "rejected")
    # the printer wrote one line per event, and its last line of round 2 says who was lost
    assert len(recorder.lines) == len(recorder.events)
    assert any(f"{VICTIM} lost" in line and "/4, accepted" in line and "lost 1" in line for line in recorder.lines)
    assert any("rogue rejected: update L2 norm" in line for line in recorder.lines)
    assert all("s left" in line for line in recorder.lines if not line.endswith(" s"))


def test_report_writes_plots_and_a_page_with_the_stores_numbers(watched_run: tuple[Path, Recorder],
                                                                 tmp_path: Path) -> None:
    run_dir, _ = watched_run
    written = write_report(run_dir, tmp_path / "report")
    pngs = [p for p in written if p.suffix == ".png"]
    assert {p.stem for p in pngs} == {"accuracy", "bytes", "round-time", "outcomes"}
    for png in pngs:
        blob = png.read_bytes()
        # a PNG with axes (an empty chart is ~8.7 KB; the size follows the axes, e.g. a 12 s round-time chart is
        # 9.4 KB), and bars drawn: the round-time chart's "wait" bars are tab:orange
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 8_000, png
    with Image.open(tmp_path / "report" / "round-time.png") as chart:
        orange = sum(n for n, rgb in chart.convert("RGB").getcolors(1 << 20) or [] if rgb == (255, 127, 14))
    assert orange > 1000, orange
    page = (tmp_path / "report" / "report.md").read_text()
    for png in pngs:
        assert f"]({png.name})" in page
    for round_id in (1, 2):
        assert f"- round {round_id}: 1 rejected (rogue): update L2 norm # exceeds the bound #" in page

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
        assert int(cells["selected"]) == selected == 4
        assert int(cells["accepted"]) == accepted == (3 if round_id == 1 else 2)
        assert int(cells["rejected"]) == sum(r["accepted"] == "False" for r in in_round) == 1
        assert int(cells["reported"]) == len(in_round)
        assert int(cells["no report"]) == selected - len(in_round) == (1 if round_id == 2 else 0)
        assert cells["up KB"] == f"{sum(int(r['bytes_up']) for r in in_round) / 1024:.0f}"
        assert cells["down KB"] == f"{sum(int(r['bytes_down']) for r in in_round) / 1024:.0f}"
        assert cells["round s"] == f"{finished_minus_started:.1f}"
        for backbone in sorted(set(PINS.values())):
            group = [r for r in in_round if r["backbone"] == backbone and r["accepted"] == "True"]
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


def _row(round_id: int, agent_id: str, backbone: str, accepted: bool, reason: str = "",
         personal: float | None = 0.5) -> MetricRow:
    return MetricRow(round=round_id, agent_id=agent_id, backbone=backbone, personal_accuracy=personal,
                     global_accuracy=None, n_test=10, n_global_test=0, n_train=50, train_loss=0.1, bytes_up=1000,
                     bytes_down=2000, train_seconds=1.0, eval_seconds=0.5, peak_rss_mb=100.0, backend="ort",
                     accepted=accepted, reason=reason)


def test_series_count_declines_and_group_rejection_reasons_across_agents() -> None:
    """The pure layer on records with what the real run above lacks: declines, several rejection reasons,
    and a round stored before the time split existed."""
    rows = [_row(1, "a", "g1", True, personal=0.8), _row(1, "b", "g1", True, personal=0.6),
            _row(1, "c", "g2", False, "update L2 norm 3.2e+06 exceeds the bound 1000; the update is rejected"),
            _row(1, "d", "g2", False, "update L2 norm 7.5e+05 exceeds the bound 1000; the update is rejected"),
            _row(1, "e", "g2", False, "declined: the round needs 900 s and this device allows 60 s", personal=None)]
    records = RunRecords(Path("run"), "r-1", "heterotune",
                         [StoredRound(1, 100.0, 130.0, 6, 2, 2, {"publish_s": 1.0, "wait_s": 20.0,
                                                                 "aggregate_s": 4.0}),
                          StoredRound(2, 130.0, 140.0, 1, 0)], rows)
    first, second = round_series(records)
    assert (first.selected, first.reported, first.accepted, first.rejected, first.declined, first.no_report) == \
        (6, 4, 2, 2, 1, 1)
    assert first.rejections == {"update L2 norm # exceeds the bound #": ["c", "d"]}
    assert first.split == {"publish": 1.0, "wait": 20.0, "aggregate": 4.0, "commit": 5.0}
    # 0.8 and 0.6 over 10 test samples each; the rejected g2 agents' own claims are not pooled
    assert first.accuracy["personal"] == {"g1": pytest.approx(0.7), "g2": None}
    assert second.split == {} and second.no_report == 1 and second.bytes_up == 0
    page = markdown_page(records, [first, second], ["accuracy.png"])
    assert "- round 1: 2 rejected (c, d): update L2 norm # exceeds the bound #" in page
    assert "- round 1: e declined: the round needs 900 s" in page
    assert "| 1 | 2 | 6 | 4 | 2 | 2 | 1 | 1 | 5 | 10 | 30.0 | 1.00 | 20.00 | 4.00 | 5.00 | 70.0 | - |" in page
    assert "| 2 | 1 | 1 | 0 | 0 | 0 | 0 | 1 | 0 | 0 | 10.0 | - | - | - | - | - | - |" in page


def test_an_observer_that_fails_never_stops_the_others() -> None:
    seen: list[str] = []

    class Broken:
        def round_started(self, event: RoundStarted) -> None:
            raise RuntimeError("observer bug")

        def update_handled(self, event: UpdateHandled) -> None:
            raise RuntimeError("observer bug")

        def round_ended(self, event: RoundEnded) -> None:
            raise RuntimeError("observer bug")

    observers = ObserverSet([Broken(), ProgressPrinter(seen.append, clock=lambda: 100.0)])
    observers.round_started(RoundStarted(3, 1, ("a", "b"), 2, 1, deadline_unix=130.0))
    observers.update_handled(UpdateHandled(3, 1, "a", "accepted"))
    observers.round_ended(RoundEnded(3, 1, True, 2, 1, 12.5))
    assert seen == ["round 3 (attempt 2): 2 agents selected, 2 updates wanted, 1 needed; 30 s left",
                    "round 3: a accepted | reported 1/2, accepted 1, rejected 0, declined 0, lost 0; 30 s left",
                    "round 3: committed with 1/2 accepted updates after 12.5 s"]
