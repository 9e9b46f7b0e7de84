"""Aggregation strategies of the coordinator (pure numpy; one strategy per module).

``make_strategy(name, **options)`` builds one by the method name a run configuration uses.
"""

from coordinator.aggregation.base import (
    AggregationResult,
    ClientUpdate,
    FederatedState,
    Strategy,
    TensorDict,
)
from coordinator.aggregation.fedproto import FedProto
from coordinator.aggregation.group_fedavg import GroupFedAvg
from coordinator.aggregation.heterotune import HeteroTune
from coordinator.aggregation.local import LocalOnly
from coordinator.aggregation.noalign import HeteroTuneNoAlign
from coordinator.aggregation.registry import STRATEGY_NAMES, make_strategy, strategy_options

__all__ = [
    "STRATEGY_NAMES",
    "AggregationResult",
    "ClientUpdate",
    "FedProto",
    "FederatedState",
    "GroupFedAvg",
    "HeteroTune",
    "HeteroTuneNoAlign",
    "LocalOnly",
    "Strategy",
    "TensorDict",
    "make_strategy",
    "strategy_options",
]
