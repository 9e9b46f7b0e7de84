"""PNG plots for the results page: both accuracy views versus round, one line per method (mean over seeds).

Why a file of its own: matplotlib is a builder-side dependency only the benchmark needs, imported here lazily
and with the non-interactive Agg backend, so rendering the Markdown never depends on a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.methods_stats import FINAL, OVERALL

VIEW_TITLES = {"personal": "personalised (own test split, after local training)",
               "global": "global (balanced held-out set, received model)"}


def mean_curve(seeds: Mapping[int, Any], view: str, group: str, points: Sequence[Any]) -> list[float]:
    """Mean over seeds at each point (round number or 'final'); NaN where a seed lacks the point."""
    out = []
    for point in points:
        values = [seeds[s][view][group].get(point, float("nan")) for s in sorted(seeds)]
        out.append(sum(values) / len(values) if values and not any(math.isnan(v) for v in values) else float("nan"))
    return out


def plot_views(tables: Mapping[str, Mapping[int, Any]], methods: Sequence[str], rounds: int, title: str,
               path: Path) -> Path:
    """Two panels (personalised, global) of overall accuracy versus round; the global panel adds 'final'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for axis, view in zip(axes, ("personal", "global"), strict=True):
        points: list[Any] = list(range(1, rounds + 1)) + ([FINAL] if view == "global" else [])
        xs = list(range(1, len(points) + 1))
        for method in methods:
            axis.plot(xs, mean_curve(tables[method], view, OVERALL, points), marker="o", label=method)
        axis.set_xticks(xs, [str(p) if p != FINAL else "final" for p in points])
        axis.set_xlabel("round (global: model received at its start)" if view == "global" else "round")
        axis.set_ylabel("accuracy, %")
        axis.set_title(VIEW_TITLES[view], fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
