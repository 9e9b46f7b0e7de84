"""Running per-group sums, so the coordinator never holds every update of a round in memory.

Every rule the engine runs needs an update only through its group's sample-weighted mean and sample count:
group scope is that mean; CMGA's group pseudo-gradient is G_b = mean_b - theta; the plain weighted mean over
all agents is sum_b n_b mean_b / N. So one pseudo-update per group, carrying the group's mean and total count,
gives the same aggregate as the individual updates (checked on real federations by the fault and e2e tests),
while memory is O(groups x adapter size) instead of O(agents x adapter size). CMGA is why the sums are per group
and not one global sum: it projects group means against each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from coordinator.aggregation.base import ClientUpdate, TensorDict


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
            weighted = update.num_samples * value.astype(np.float64)
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
            means: TensorDict = {k: (v / group.samples).astype(np.float32) for k, v in group.sums.items()}
            out.append(ClientUpdate(agent_id=f"group:{name}", group=name, num_samples=group.samples, tensors=means))
        return out
