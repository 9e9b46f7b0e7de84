"""``local``: no aggregation; every agent trains only on its own data.

The reference for personalised accuracy under label skew (the pilot's strongest baseline). Agents
upload nothing, so an update that carries tensors is a configuration error (a tensor would leave
a device in a method that promises none do) and is rejected; updates with empty ``tensors``
(sample counts and metrics only) are accepted and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from coordinator.aggregation.base import AggregationResult, ClientUpdate, FederatedState
from coordinator.aggregation.mean import copy_state


@dataclass(frozen=True)
class LocalOnly:
    """Returns a copy of the state unchanged."""

    name: ClassVar[str] = "local"

    def aggregate(
        self, state: FederatedState, updates: Sequence[ClientUpdate], round_id: int
    ) -> AggregationResult:
        for update in updates:
            if update.tensors:
                raise ValueError(
                    f"local: agent {update.agent_id!r} uploaded tensors {sorted(update.tensors)}; "
                    "agents upload nothing in the local method"
                )
        diagnostics: dict[str, Any] = {
            "strategy": self.name,
            "round_id": round_id,
            "num_updates": len(updates),
        }
        return AggregationResult(state=copy_state(state), diagnostics=diagnostics)
