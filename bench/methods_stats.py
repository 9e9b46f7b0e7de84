"""From per-agent rows to the numbers of the evaluation protocol: both views, per device group and overall.

Why these definitions (docs/design.md, "Evaluation protocol"):
- personalised accuracy of a group in round r = correct / total over its agents' own local test splits, after
  their local training in round r (pooled, i.e. the sample-weighted mean over agents);
- global accuracy of a group in round r = the same pooling on the balanced held-out set, of the model each
  agent *received* at the start of round r (before training); "final" is the model received after the last
  aggregation (evaluated by the runner once the rounds are over).
Groups are device classes (the backbone a device would get on its own), so ``smallest-common`` is reported
for the same devices as the other methods even though all of them run the smallest backbone there.
Seeds are paired: every method of a seed sees the same fleet data, so differences are taken per seed first.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

OVERALL = "overall"
FINAL = "final"


def _pool(rows: Iterable[Mapping[str, Any]], correct: str, total: str) -> float:
    rows = list(rows)
    n = sum(r[total] for r in rows)
    return 100.0 * sum(r[correct] for r in rows) / n if n else float("nan")


def view_table(result: Mapping[str, Any], groups: Sequence[str]) -> dict[str, dict[str, dict[Any, float]]]:
    """{view: {group or 'overall': {round or 'final': accuracy %}}} for one job's result."""
    rows = result["rounds"]
    rounds = sorted({r["round"] for r in rows})
    out: dict[str, dict[str, dict[Any, float]]] = {"personal": {}, "global": {}}
    for group in [*groups, OVERALL]:
        mine = [r for r in rows if group in (OVERALL, r["home_backbone"])]
        out["personal"][group] = {k: _pool((r for r in mine if r["round"] == k), "personal_correct", "personal_total")
                                  for k in rounds}
        out["global"][group] = {k: _pool((r for r in mine if r["round"] == k and r["global_correct"] is not None),
                                         "global_correct", "global_total") for k in rounds}
        final = [v for v in result["final_global"].values() if group in (OVERALL, v["home_backbone"])]
        out["global"][group][FINAL] = _pool(final, "correct", "total")
    return out


def headline(table: Mapping[str, Mapping[str, Mapping[Any, float]]], last_round: int) -> dict[str, dict[str, float]]:
    """The two numbers a method is judged by: personal after the last round, global of the final aggregate."""
    return {
        "personal": {g: v[last_round] for g, v in table["personal"].items()},
        "global": {g: v[FINAL] for g, v in table["global"].items()},
    }


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan with one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Exact two-sided paired permutation (sign-flip) test of mean difference = 0.

    Why this test: it assumes only that, under no effect, each seed's difference is as likely to have either
    sign; with n seeds the smallest possible p is 2 / 2^n (0.5 for 2 seeds, 0.0625 for 5), which is reported as
    it is rather than dressed up by a t-test on too few samples.
    """
    n = len(diffs)
    if n == 0:
        return float("nan")
    observed = abs(sum(diffs))
    hits = sum(1 for signs in itertools.product((1, -1), repeat=n)
               if abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - 1e-12)
    return hits / 2 ** n


def paired(per_seed: Mapping[int, float], base: Mapping[int, float]) -> dict[str, Any]:
    """Per-seed differences (method - baseline) with mean, sd and the sign-flip p-value."""
    seeds = sorted(set(per_seed) & set(base))
    diffs = [per_seed[s] - base[s] for s in seeds]
    if not diffs or any(math.isnan(d) for d in diffs):
        return {"seeds": seeds, "diffs": diffs, "mean": float("nan"), "sd": float("nan"), "p": float("nan")}
    mean, sd = mean_sd(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "sd": sd, "p": sign_flip_p(diffs)}


def cosine_summary(results: Iterable[Mapping[str, Any]]) -> dict[str, float] | None:
    """Cross-group cosines of the global tensors' group pseudo-gradients, pooled over rounds and seeds."""
    cosines: list[float] = []
    projections = 0
    for result in results:
        for diag in result["diagnostics"].values():
            cosines.extend(diag.get("cosines", []))
            projections += int(diag.get("num_projections", 0))
    if not cosines:
        return None
    return {"n": len(cosines), "mean": statistics.fmean(cosines),
            "mean_abs": statistics.fmean(abs(c) for c in cosines),
            "negative": sum(1 for c in cosines if c < 0), "min": min(cosines), "projections": projections}
