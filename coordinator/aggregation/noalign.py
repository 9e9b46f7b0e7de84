"""``heterotune-noalign``: DeMA with the plain cross-model mean (HeteroTune v1's aggregator).

Global-scope tensors: sample-weighted mean of every agent's theta_k, whatever its backbone.
Group-scope tensors: sample-weighted mean within each backbone group.

It is the baseline CMGA has to beat (the pilot found CMGA indistinguishable from it), so it also
reports the cosines between group pseudo-gradients, computed exactly as ``heterotune`` does, to
compare conflict statistics between the two runs without changing the update.
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
from coordinator.aggregation.mean import (
    as_float32,
    group_means,
    group_pseudo_gradients,
    mean_of_updates,
    pairwise_cosines,
    sample_counts,
    updates_by_group,
)


@dataclass(frozen=True)
class HeteroTuneNoAlign:
    """Plain sample-weighted mean over all agents for global tensors; group mean for group tensors."""

    name: ClassVar[str] = "heterotune-noalign"

    def aggregate(
        self, state: FederatedState, updates: Sequence[ClientUpdate], round_id: int
    ) -> AggregationResult:
        validate_updates(state, updates)
        by_group = updates_by_group(updates)
        if updates:
            new_global = {name: mean_of_updates(updates, name) for name in state.global_tensors}
            cosines = {
                name: pairwise_cosines(group_pseudo_gradients(theta, by_group, name))
                for name, theta in state.global_tensors.items()
            }
        else:
            new_global = dict(state.global_tensors)
            cosines = {}
        new_state = FederatedState(
            global_tensors=as_float32(new_global), group_tensors=group_means(state, by_group)
        )
        diagnostics: dict[str, Any] = {
            "strategy": self.name,
            "round_id": round_id,
            "num_updates": len(updates),
            "group_samples": sample_counts(by_group),
            "tensors": {name: {"cosines": c} for name, c in cosines.items()},
        }
        return AggregationResult(state=new_state, diagnostics=diagnostics)
