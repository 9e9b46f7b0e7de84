"""The report's PNG plots, drawn from RoundSeries (coordinator/run_report.py).

Why a file of its own: matplotlib is needed only to draw a report, not to run a federation, so it is imported
here lazily, with the non-interactive Agg backend (no display needed), and a missing matplotlib is a clear
error rather than a failed coordinator start.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator.run_report import VIEWS, ReportError, RoundSeries
from protocols.durable import write_atomic

VIEW_TITLES = {"personal": "personal (own test split, after local training)",
               "global": "global (held-out set, model received)"}
SPLIT_ORDER = ("publish", "wait", "aggregate", "commit")
DPI = 80  # small files: the docs commit an example


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ReportError("drawing the report needs matplotlib (pip install 'matplotlib>=3.8', as in "
                          "requirements/builder.txt)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(series: Sequence[RoundSeries], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    return [plot_accuracy(plt, series, out_dir / "accuracy.png"), plot_bytes(plt, series, out_dir / "bytes.png"),
            plot_round_time(plt, series, out_dir / "round-time.png"),
            plot_outcomes(plt, series, out_dir / "outcomes.png")]


def _percent(value: float | None) -> float:
    return math.nan if value is None else 100 * value


def plot_accuracy(plt: Any, series: Sequence[RoundSeries], path: Path) -> Path:
    """Two panels, personal and global; one line per backbone group."""
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True, sharey=True)
    rounds = [s.round_id for s in series]
    groups = sorted({g for s in series for g in s.accuracy["personal"]})
    for axis, view in zip(axes, VIEWS, strict=True):
        for group in groups:
            axis.plot(rounds, [_percent(s.accuracy[view].get(group)) for s in series], marker="o", label=group)
        axis.set_title(VIEW_TITLES[view], fontsize=9)
        axis.set_xlabel("round")
        axis.set_xticks(rounds)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy, %")
    axes[0].legend(fontsize=8, title="backbone group", title_fontsize=8)
    return _save(plt, figure, path)


def plot_bytes(plt: Any, series: Sequence[RoundSeries], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    rounds = [s.round_id for s in series]
    width = 0.38
    axis.bar([r - width / 2 for r in rounds], [s.bytes_up / 1e6 for s in series], width, label="up (updates)")
    axis.bar([r + width / 2 for r in rounds], [s.bytes_down / 1e6 for s in series], width,
             label="down (bundles, weights)")
    axis.set(xlabel="round", ylabel="MB, all agents", title="bytes per round")
    values = [v for s in series for v in (s.bytes_up, s.bytes_down) if v > 0]
    if values and max(values) > 50 * min(values):  # round 1's bundle download would flatten every other bar
        axis.set_yscale("log")
        axis.set_ylim(bottom=min(values) / 1e6 / 4)
        axis.set_ylabel("MB, all agents (log scale)")
    axis.set_xticks(rounds)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    return _save(plt, figure, path)


def plot_round_time(plt: Any, series: Sequence[RoundSeries], path: Path) -> Path:
    """Stacked publish / wait / aggregate / commit seconds; a round recorded without the split is one bar."""
    figure, axis = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    rounds = [s.round_id for s in series]
    bottom = [0.0] * len(series)
    for part in SPLIT_ORDER:
        heights = [s.split.get(part, 0.0) for s in series]
        axis.bar(rounds, heights, 0.6, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    unsplit = [s.seconds if not s.split else 0.0 for s in series]
    if any(unsplit):
        axis.bar(rounds, unsplit, 0.6, bottom=bottom, label="total (not split)", color="grey")
    axis.set(xlabel="round", ylabel="seconds", title="round time")
    axis.set_xticks(rounds)
    _legend_outside(axis)
    axis.grid(alpha=0.3, axis="y")
    return _save(plt, figure, path)


def plot_outcomes(plt: Any, series: Sequence[RoundSeries], path: Path) -> Path:
    """Per round: invited agents split into accepted, rejected, declined and no report (dropouts)."""
    figure, axis = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    rounds = [s.round_id for s in series]
    bottom = [0] * len(series)
    for label, values, color in (("accepted", [s.accepted for s in series], "tab:green"),
                                 ("rejected", [s.rejected for s in series], "tab:red"),
                                 ("declined", [s.declined for s in series], "tab:orange"),
                                 ("no report (dropped)", [s.no_report for s in series], "tab:grey")):
        axis.bar(rounds, values, 0.6, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axis.set(xlabel="round", ylabel="agents invited", title="outcomes per round")
    axis.set_xticks(rounds)
    axis.set_yticks(range(0, max(bottom, default=0) + 1))
    _legend_outside(axis)
    axis.grid(alpha=0.3, axis="y")
    return _save(plt, figure, path)


def _legend_outside(axis: Any) -> None:
    """Beside the bars, never over them (a stacked bar fills its axis to the top)."""
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _save(plt: Any, figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    write_atomic(path, buffer.getvalue())
    return path
