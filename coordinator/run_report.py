"""`coordinator report RUN_DIR`: a finished (or stopped) run's records turned into per-round series and a page.

Why two sources: metrics.csv holds what every agent reported (accuracies, bytes, accepted or rejected with the
reason) and is the file operators already read; coordinator.sqlite holds what only the coordinator knows (how
many agents each round invited, when it started and finished, the time split). Everything here is pure: it
reads the two files once into :class:`RunRecords` and computes :class:`RoundSeries` from them; plotting
(coordinator/report_plots.py) and writing are the thin layer at the edge.
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from coordinator.report import _pct, weighted
from coordinator.store import STORE_FILE, MetricRow, metric_row
from protocols.durable import write_atomic

METRICS_FILE = "metrics.csv"
REPORT_FILE = "report.md"
VIEWS = ("personal", "global")
_INT = {"round", "n_test", "n_global_test", "n_train", "bytes_up", "bytes_down"}
_FLOAT = {"train_seconds", "eval_seconds", "peak_rss_mb"}
_OPTIONAL = {"personal_accuracy", "global_accuracy", "train_loss"}


class ReportError(ValueError):
    """The run directory cannot be reported on; the message says which file and what to do."""


@dataclass(frozen=True)
class StoredRound:
    """One committed round as the coordinator recorded it."""

    round_id: int
    started: float
    finished: float
    selected: int
    accepted: int
    attempts: int = 1  # 1 + the retries it took (an abandoned attempt commits nothing)
    timing: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecords:
    run_dir: Path
    run_id: str
    method: str
    rounds: list[StoredRound]
    metrics: list[MetricRow]


@dataclass(frozen=True)
class RoundSeries:
    """Everything the page and the plots show about one round, computed from the records only."""

    round_id: int
    attempts: int
    selected: int
    reported: int  # agents whose update arrived complete (accepted or rejected)
    accepted: int
    rejected: int
    declined: int
    no_report: int  # invited, but never reported nor declined: lost, or still training when the round closed
    rejections: dict[str, list[str]]  # reason (numbers as #) -> the agents rejected for it
    bytes_up: int
    bytes_down: int
    seconds: float
    split: dict[str, float]  # publish / wait / aggregate / commit; empty for runs recorded before the split
    accuracy: dict[str, dict[str, float | None]]  # view -> backbone group -> pooled accuracy (0-1)


# --- reading (the only I/O besides writing) --------------------------------------------------------------


def load_run(run_dir: Path) -> RunRecords:
    """Read a run directory's store and metrics.csv, or raise ReportError saying what is missing or broken."""
    store_path = run_dir / STORE_FILE
    if not store_path.is_file():
        raise ReportError(f"{run_dir} is not a run directory (no {STORE_FILE}); give the --out directory of "
                          "`coordinator run` or `coordinator demo`")
    rounds, meta = _read_store(store_path)
    metrics = read_metrics_csv(run_dir / METRICS_FILE)
    config = meta.get("config") or {}
    return RunRecords(run_dir, str(meta.get("run_id") or "(unknown)"),
                      str(config.get("method", "?")) if isinstance(config, dict) else "?", rounds, metrics)


def _read_store(path: Path, round_id: int | None = None) -> tuple[list[StoredRound], dict[str, Any]]:
    """The committed rounds (only ``round_id`` when given) and the run's meta, read-only."""
    only = "" if round_id is None else " WHERE round_id = ?"
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM run")}
            raw = db.execute("SELECT round_id, started, finished, selected, accepted, diagnostics FROM rounds"
                             f"{only} ORDER BY round_id", () if round_id is None else (round_id,)).fetchall()
        finally:
            db.close()
    except (sqlite3.Error, json.JSONDecodeError) as exc:
        raise ReportError(f"{path} cannot be read as the coordinator's store ({exc}); restore it from a copy "
                          "of the run directory") from None
    rounds = []
    for round_id, started, finished, selected, accepted, diagnostics in raw:
        try:
            raw_timing = json.loads(diagnostics).get("timing", {})
            attempt = int(raw_timing.get("attempt", 0))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            raw_timing, attempt = {}, 0
        timing = {k: float(v) for k, v in raw_timing.items() if k.endswith("_s") and isinstance(v, int | float)}
        rounds.append(StoredRound(int(round_id), float(started), float(finished), int(selected), int(accepted),
                                  attempt + 1, timing))
    return rounds, meta


def read_round(run_dir: Path, round_id: int) -> tuple[StoredRound, list[MetricRow]] | None:
    """One committed round and its metrics rows, read (read-only) from a run's store while the run goes on;
    None if the round is not committed. For observers such as coordinator/tracking.py, which see a round end
    before metrics.csv exists (it is written when the run ends)."""
    rounds, _ = _read_store(run_dir / STORE_FILE, round_id)
    if not rounds:
        return None
    db = sqlite3.connect(f"file:{run_dir / STORE_FILE}?mode=ro", uri=True)
    try:
        rows = [metric_row(row) for row in
                db.execute("SELECT * FROM metrics WHERE round_id = ? ORDER BY agent_id", (round_id,))]
    finally:
        db.close()
    return rounds[0], rows


def read_metrics_csv(path: Path) -> list[MetricRow]:
    """metrics.csv back into MetricRows (the inverse of report.write_metrics_csv), strictly checked."""
    if not path.is_file():
        raise ReportError(f"{path} is missing: the run has not written it yet (it is written when the run ends); "
                          "report on a finished run, or resume this one with `coordinator run --resume`")
    names = [f.name for f in fields(MetricRow)]
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [n for n in names if n not in (reader.fieldnames or [])]
            if missing:
                raise ReportError(f"{path} lacks the column(s) {', '.join(missing)}; it is not a metrics.csv "
                                  "written by this coordinator")
            return [_row(line, names) for line in reader]
    except (ValueError, UnicodeDecodeError, csv.Error) as exc:
        if isinstance(exc, ReportError):
            raise
        raise ReportError(f"{path} is corrupt ({exc}); it is rewritten from the store when the run ends") from None


def _row(line: dict[str, Any], names: Sequence[str]) -> MetricRow:
    extra = line.get(None)  # type: ignore[call-overload]  # DictReader's key for fields past the header
    if extra:
        raise ValueError(f"a line has more fields than the header: {extra}")
    values: dict[str, Any] = {}
    for name in names:
        text = line[name]
        if name in _OPTIONAL:
            values[name] = float(text) if text else None
        elif name in _INT:
            values[name] = int(text)
        elif name in _FLOAT:
            values[name] = float(text)
        elif name == "accepted":
            if text not in ("True", "False"):
                raise ValueError(f"accepted is {text!r}, not True or False")
            values[name] = text == "True"
        else:
            values[name] = text
    return MetricRow(**values)


# --- pure series -----------------------------------------------------------------------------------------


def round_series(records: RunRecords) -> list[RoundSeries]:
    """One RoundSeries per committed round, groups taken from every backbone seen in the run."""
    groups = sorted({r.backbone for r in records.metrics})
    return [_series(stored, [m for m in records.metrics if m.round == stored.round_id], groups)
            for stored in records.rounds]


def _series(stored: StoredRound, rows: Sequence[MetricRow], groups: Sequence[str]) -> RoundSeries:
    declined = [r for r in rows if not r.accepted and r.reason.startswith("declined:")]
    rejected = [r for r in rows if not r.accepted and r not in declined]
    accepted = [r for r in rows if r.accepted]
    seconds = stored.finished - stored.started
    split = {}
    if stored.timing:
        split = {k.removesuffix("_s"): v for k, v in stored.timing.items()}
        split["commit"] = max(0.0, seconds - sum(split.values()))
    return RoundSeries(
        round_id=stored.round_id, attempts=stored.attempts, selected=stored.selected,
        reported=len(accepted) + len(rejected), accepted=len(accepted), rejected=len(rejected), declined=len(declined),
        no_report=max(0, stored.selected - len(rows)),
        rejections=_by_reason(rejected),
        bytes_up=sum(r.bytes_up for r in rows), bytes_down=sum(r.bytes_down for r in rows), seconds=seconds,
        split=split,
        accuracy={view: {g: weighted([r for r in accepted if r.backbone == g], f"{view}_accuracy",
                                     "n_test" if view == "personal" else "n_global_test") for g in groups}
                  for view in VIEWS})


def _by_reason(rejected: Sequence[MetricRow]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in sorted(rejected, key=lambda r: r.agent_id):
        out.setdefault(_reason_kind(row.reason), []).append(row.agent_id)
    return out


def _reason_kind(reason: str) -> str:
    """A short, stable label for a rejection reason (its first clause, numbers as #), so counts group across
    agents and rounds."""
    head = re.sub(r"(?<![\w.])\d[\d.eE+-]*", "#", reason.split(";", 1)[0]).strip() or "rejected"
    return head[:80]


NOTES = ("Accuracy is pooled over a group's accepted updates (weighted by test samples; what a rejected agent "
         "says about itself is not trusted): *personal* on each agent's own test split after local training, "
         "*global* on the balanced held-out set with the model the agent received. *no report*: invited but "
         "neither reported nor declined (lost, or still training when the round closed). *attempts*: 1 + the "
         "retries the round needed. The time split is publish (weights and assignments out), wait (for updates), "
         "aggregate, and commit (the rest: tensors and database).")


# --- the page --------------------------------------------------------------------------------------------


def markdown_page(records: RunRecords, series: Sequence[RoundSeries], plots: Sequence[str]) -> str:
    """One page: what ran, the plots, and a table per round whose numbers come straight from the series."""
    groups = sorted({g for s in series for g in s.accuracy["personal"]})
    agents = sorted({m.agent_id for m in records.metrics})
    lines = [f"# Run {records.run_id}", "",
             f"Method `{records.method}`, {len(series)} committed rounds, {len(agents)} agents reporting, backbone "
             f"groups: {', '.join(groups) or 'none'}. Source: `{records.run_dir}` ({STORE_FILE} and "
             f"{METRICS_FILE}).", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    columns = ["round", "attempts", "selected", "reported", "accepted", "rejected", "declined", "no report", "up KB",
               "down KB", "round s", "publish s", "wait s", "aggregate s", "commit s"]
    columns += [f"{g} {view} %" for view in VIEWS for g in groups]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in series:
        cells = [str(s.round_id), str(s.attempts), str(s.selected), str(s.reported), str(s.accepted), str(s.rejected),
                 str(s.declined), str(s.no_report), f"{s.bytes_up / 1024:.0f}", f"{s.bytes_down / 1024:.0f}",
                 f"{s.seconds:.1f}"]
        cells += [f"{s.split[k]:.2f}" if k in s.split else "-" for k in ("publish", "wait", "aggregate", "commit")]
        cells += [_pct(s.accuracy[view].get(g)) for view in VIEWS for g in groups]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", NOTES, ""]
    reasons = [(s.round_id, kind, agents) for s in series for kind, agents in sorted(s.rejections.items())]
    declines = [(m.round, m.agent_id, m.reason) for m in records.metrics if m.reason.startswith("declined:")]
    if reasons or declines:
        lines += ["## Rejections and declines", ""]
        lines += [f"- round {r}: {len(a)} rejected ({', '.join(a)}): {kind}" for r, kind, a in reasons]
        lines += [f"- round {r}: {a} {reason}" for r, a, reason in declines]
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Plots and report.md into ``out_dir`` (default RUN_DIR/report); returns the files written."""
    from coordinator.report_plots import plot_all  # matplotlib only when a report is actually drawn

    records = load_run(run_dir)
    series = round_series(records)
    if not series:
        raise ReportError(f"{run_dir} has no committed round yet; nothing to report")
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_all(series, out_dir)
    page = out_dir / REPORT_FILE
    write_atomic(page, markdown_page(records, series, [p.name for p in plots]).encode("utf-8"))
    return [*plots, page]


