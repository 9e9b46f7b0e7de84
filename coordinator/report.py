"""What a run tells its operator: a per-round table on the terminal, metrics.csv and summary.json on disk."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.store import MetricRow

CSV_COLUMNS = [f.name for f in fields(MetricRow)]


def weighted(rows: Iterable[MetricRow], attr: str, weight: str) -> float | None:
    """Sample-weighted mean of an accuracy over agents (pooled accuracy); None if nobody reported it."""
    pairs = [(getattr(r, attr), getattr(r, weight)) for r in rows if getattr(r, attr) is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def round_summary(rows: Sequence[MetricRow]) -> dict[str, Any]:
    """Both accuracy views overall and per backbone group, plus bytes and times, for one round."""
    by_group: dict[str, list[MetricRow]] = defaultdict(list)
    for r in rows:
        by_group[r.backbone].append(r)
    return {
        "personal_accuracy": weighted(rows, "personal_accuracy", "n_test"),
        "global_accuracy": weighted(rows, "global_accuracy", "n_global_test"),
        "groups": {g: {"personal_accuracy": weighted(rs, "personal_accuracy", "n_test"),
                       "global_accuracy": weighted(rs, "global_accuracy", "n_global_test"),
                       "agents": len(rs)} for g, rs in sorted(by_group.items())},
        "mean_bytes_up": sum(r.bytes_up for r in rows) / max(1, len(rows)),
        "mean_bytes_down": sum(r.bytes_down for r in rows) / max(1, len(rows)),
        "accepted": sum(r.accepted for r in rows),
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def print_round(console: Console, round_id: int, rows: Sequence[MetricRow], seconds: float, *,
                title: str | None = None) -> None:
    table = Table(title=f"{title or f'round {round_id}'}  ({seconds:.1f} s)", title_justify="left")
    for column in ("agent", "backbone", "personal %", "global %", "loss", "up KB", "down KB", "train s",
                   "peak MB", "status"):
        table.add_column(column, justify="left" if column in ("agent", "backbone", "status") else "right")
    for r in sorted(rows, key=lambda r: (r.backbone, r.agent_id)):
        table.add_row(r.agent_id, r.backbone, _pct(r.personal_accuracy), _pct(r.global_accuracy),
                      f"{r.train_loss:.3f}" if r.train_loss is not None else "-", f"{r.bytes_up / 1024:.0f}",
                      f"{r.bytes_down / 1024:.0f}", f"{r.train_seconds:.1f}", f"{r.peak_rss_mb:.0f}",
                      "ok" if r.accepted else f"rejected: {r.reason[:40]}")
    summary = round_summary(rows)
    for group, values in summary["groups"].items():
        table.add_row("[bold]group", group, _pct(values["personal_accuracy"]), _pct(values["global_accuracy"]),
                      "", "", "", "", "", f"{values['agents']} agents")
    table.add_row("[bold]all", "", _pct(summary["personal_accuracy"]), _pct(summary["global_accuracy"]),
                  "", "", "", "", "", "")
    console.print(table)


def write_metrics_csv(path: Path, rows: Iterable[MetricRow]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2, sort_keys=True))


def rounds_overview(rows: Sequence[MetricRow]) -> list[dict[str, Any]]:
    by_round: dict[int, list[MetricRow]] = defaultdict(list)
    for r in rows:
        by_round[r.round].append(r)
    return [{"round": k, **round_summary(v)} for k, v in sorted(by_round.items())]


def final_overview(rows: Sequence[MetricRow]) -> dict[str, Any]:
    """The final model's evaluation (after the last round): both views overall and per group, and per agent the
    personal accuracy of its own final model and the global accuracy of the aggregate it received."""
    summary = round_summary(rows)
    return {
        "personal_accuracy": summary["personal_accuracy"],
        "global_accuracy": summary["global_accuracy"],
        "groups": summary["groups"],
        "agents": {r.agent_id: {"backbone": r.backbone, "personal_accuracy": r.personal_accuracy,
                                "global_accuracy": r.global_accuracy, "n_test": r.n_test,
                                "n_global_test": r.n_global_test}
                   for r in sorted(rows, key=lambda r: r.agent_id) if r.accepted},
    }
