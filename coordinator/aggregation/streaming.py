"""Running per-group sums, so the coordinator never holds every update of a round in memory.

Every rule the engine runs needs an update only through its group's sample-weighted mean and sample count:
group scope is that mean; CMGA's group pseudo-gradient is G_b = mean_b - theta; the plain weighted mean over
all agents is sum_b n_b mean_b / N. So one pseudo-update per group, carrying the group's mean and total count,
gives the same aggregate as the individual updates (checked on real federations by the fault and e2e tests),
while memory is O(groups x adapter size) instead of O(agents x adapter size). CMGA is why the sums are per group
and not one global sum: it projects group means against each other.

fedproto's prototypes are the exception: their rule weights each by its own class count, not by the agent's
sample count. So a prototype is summed count-weighted and a count plainly; the group's pseudo-update then
carries the group's count-weighted class mean and its total count, from which the rule gives the exact
fleet-wide mean (sum_g M_g P_g / sum_g M_g).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from coordinator.aggregation.base import ClientUpdate, TensorDict
from protocols.prototypes import count_class, count_name, prototype_class


@dataclass
class _GroupSum:
    samples: int = 0
    agents: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)


class GroupAccumulator:
    """Add validated updates one at a time; read back one pseudo-update per backbone group."""

    def __init__(self) -> None:
        self._groups: dict[str, _GroupSum] = {}

    def add(self, update: ClientUpdate) -> None:
        if update.num_samples <= 0:
            raise ValueError(f"update from {update.agent_id} has {update.num_samples} samples; it must be > 0")
        group = self._groups.setdefault(update.group, _GroupSum())
        if group.agents and set(update.tensors) != set(group.sums):
            raise ValueError(f"update from {update.agent_id} has other tensors than the rest of group {update.group}")
        for name, value in update.tensors.items():
            weighted = _weight(update, name) * value.astype(np.float64)
            group.sums[name] = group.sums[name] + weighted if name in group.sums else weighted
        group.samples += update.num_samples
        group.agents += 1

    def __len__(self) -> int:
        """Number of updates added (not groups)."""
        return sum(g.agents for g in self._groups.values())

    def as_updates(self) -> list[ClientUpdate]:
        """One update per group: its sample-weighted mean tensors and its total sample count."""
        out = []
        for name, group in sorted(self._groups.items()):
            means: TensorDict = {k: _mean(group, k).astype(np.float32) for k in group.sums}
            out.append(ClientUpdate(agent_id=f"group:{name}", group=name, num_samples=group.samples, tensors=means))
        return out


def _count_name(name: str) -> str | None:
    """The count tensor that weights a prototype tensor (None for anything else)."""
    class_key = prototype_class(name)
    return None if class_key is None else count_name(class_key)


def _weight(update: ClientUpdate, name: str) -> float:
    """What a tensor of ``update`` is weighted by in its group's sum: its class count for a prototype, 1 for a
    count (counts add up), the agent's sample count for everything else."""
    count = _count_name(name)
    if count is not None:
        if count not in update.tensors:
            raise ValueError(f"update from {update.agent_id} has prototype {name!r} without {count!r}")
        return float(update.tensors[count])
    return 1.0 if count_class(name) is not None else float(update.num_samples)


def _mean(group: _GroupSum, name: str) -> np.ndarray:
    count = _count_name(name)
    if count is not None:  # count-weighted class mean; zero (with count 0) where no agent of the group saw it
        total = float(group.sums[count])
        return group.sums[name] / total if total > 0 else np.zeros_like(group.sums[name])
    if count_class(name) is not None:
        return group.sums[name]
    return group.sums[name] / group.samples
