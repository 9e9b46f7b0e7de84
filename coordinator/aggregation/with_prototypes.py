"""A method's own rule plus fedproto's prototype exchange, for a design that shares adapters *and* prototypes.

Why: the DeMA experts are shared across backbones in the r-space, but each backbone's W_in decides where in that
space its tokens land, so experts trained on one backbone may see another backbone's classes elsewhere. Pulling
every device's representation towards the fleet's class prototypes (fedproto's loss term) is an alignment of
those projections; combining it with heterotune tests whether aligned inputs make the shared experts transfer.

The prototype tensors (protocols/prototypes.py) are split off: the inner rule aggregates everything else as it
would without them, and the prototypes follow fedproto's count-weighted rule (coordinator/aggregation/fedproto.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.aggregation.base import AggregationResult, ClientUpdate, FederatedState, Strategy, TensorDict
from coordinator.aggregation.fedproto import FedProto
from protocols.prototypes import is_prototype_name


def _only(tensors: TensorDict, prototypes: bool) -> TensorDict:
    """The prototype tensors (``prototypes``) or everything else."""
    return {name: value for name, value in tensors.items() if is_prototype_name(name) == prototypes}


def _part(state: FederatedState, updates: Sequence[ClientUpdate], prototypes: bool
          ) -> tuple[FederatedState, list[ClientUpdate]]:
    """The state and updates restricted to the prototypes (global only) or to the model tensors."""
    groups = {group: ({} if prototypes else dict(tensors)) for group, tensors in state.group_tensors.items()}
    part = FederatedState(global_tensors=_only(state.global_tensors, prototypes), group_tensors=groups)
    return part, [ClientUpdate(u.agent_id, u.group, u.num_samples, _only(u.tensors, prototypes)) for u in updates]


@dataclass(frozen=True)
class WithPrototypes:
    """``inner`` on the model tensors, fedproto on the prototypes; diagnostics of both."""

    inner: Strategy

    @property
    def name(self) -> str:
        return f"{self.inner.name}+prototypes"

    def aggregate(self, state: FederatedState, updates: Sequence[ClientUpdate], round_id: int) -> AggregationResult:
        model = self.inner.aggregate(*_part(state, updates, False), round_id)
        protos = FedProto().aggregate(*_part(state, updates, True), round_id)
        merged = FederatedState(global_tensors={**model.state.global_tensors, **protos.state.global_tensors},
                                group_tensors=model.state.group_tensors)
        return AggregationResult(merged, {**model.diagnostics, "prototypes": protos.diagnostics,
                                          "strategy": self.name})
