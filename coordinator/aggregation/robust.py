"""Coordinate-wise robust estimates of a backbone group's update: median or trimmed mean.

Why: the sample-weighted mean lets one update pull every coordinate arbitrarily far (and trusts each device's
sample count as its weight). A coordinate-wise median or trimmed mean bounds what a minority of devices can do
to any coordinate, whatever they send or claim. It replaces the group's mean *before* the run's rule sees it: the
engine hands the rule one pseudo-update per group (as it does with the streaming sums, coordinator/aggregation/
streaming.py), so group scope gets the robust estimate directly and global scope gets the rule (e.g. CMGA)
applied to robust group estimates. Robust estimates are unweighted: a device's claimed n_train does not move
them; the pseudo-update still carries the group's total count, which weights the groups against each other.

Pure numpy; needs every update of a group at once (O(group size x adapter size) memory, unlike the streaming
mean), which is why it is an option (``robust_rule`` in the run config) and not the default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from coordinator.aggregation.base import ClientUpdate, TensorDict

ROBUST_RULES = ("mean", "median", "trimmed_mean")


def coordinate_median(values: Sequence[np.ndarray]) -> np.ndarray:
    """The median of each coordinate over the values (the mean of the middle two for an even count)."""
    return np.median(np.stack([np.asarray(v, dtype=np.float64) for v in values]), axis=0)


def trimmed_mean(values: Sequence[np.ndarray], trim_fraction: float) -> np.ndarray:
    """Per coordinate: drop the floor(trim_fraction x n) smallest and as many largest values, average the rest."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    stacked = np.sort(np.stack([np.asarray(v, dtype=np.float64) for v in values]), axis=0)
    k = math.floor(trim_fraction * len(values))
    return np.mean(stacked[k:len(values) - k], axis=0)


def robust_group_updates(updates: Sequence[ClientUpdate], rule: str, trim_fraction: float = 0.2
                         ) -> list[ClientUpdate]:
    """One pseudo-update per group: the rule's estimate of every tensor, and the group's total sample count."""
    if rule not in ROBUST_RULES[1:]:
        raise ValueError(f"unknown robust rule {rule!r}; choose one of {', '.join(ROBUST_RULES[1:])}")
    groups: dict[str, list[ClientUpdate]] = {}
    for update in updates:
        groups.setdefault(update.group, []).append(update)
    out = []
    for group, members in sorted(groups.items()):
        names = set(members[0].tensors)
        if any(set(m.tensors) != names for m in members):
            raise ValueError(f"updates of group {group} carry different tensors")
        estimate: TensorDict = {}
        for name in sorted(names):
            values = [m.tensors[name] for m in members]
            value = coordinate_median(values) if rule == "median" else trimmed_mean(values, trim_fraction)
            estimate[name] = value.astype(np.float32)
        out.append(ClientUpdate(agent_id=f"group:{group}", group=group,
                                num_samples=sum(m.num_samples for m in members), tensors=estimate))
    return out
