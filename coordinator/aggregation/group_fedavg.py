"""``group-fedavg``: FedAvg run separately inside each backbone group; nothing crosses backbones.

It is the "no cross-model sharing" baseline. The run configures every shared family with group
scope for this method, so the state has no global tensors. A non-empty ``global_tensors`` means
the scope configuration does not match the method, and averaging those tensors across backbones
would silently turn this baseline into a sharing method, so it is an error rather than a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from coordinator.aggregation.base import (
    AggregationResult,
    ClientUpdate,
    FederatedState,
    validate_updates,
)
from coordinator.aggregation.mean import group_means, sample_counts, updates_by_group


@dataclass(frozen=True)
class GroupFedAvg:
    """Sample-weighted mean of every shared tensor within each backbone group."""

    name: ClassVar[str] = "group-fedavg"

    def aggregate(
        self, state: FederatedState, updates: Sequence[ClientUpdate], round_id: int
    ) -> AggregationResult:
        if state.global_tensors:
            raise ValueError(
                "group-fedavg expects no global-scope tensors, but the state has "
                f"{sorted(state.global_tensors)}; configure their scope as group for this method"
            )
        validate_updates(state, updates)
        by_group = updates_by_group(updates)
        new_state = FederatedState(global_tensors={}, group_tensors=group_means(state, by_group))
        diagnostics: dict[str, Any] = {
            "strategy": self.name,
            "round_id": round_id,
            "num_updates": len(updates),
            "group_samples": sample_counts(by_group),
        }
        return AggregationResult(state=new_state, diagnostics=diagnostics)
