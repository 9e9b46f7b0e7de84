"""Name -> strategy factory, so a run configuration names its method as a string.

Options are validated here (unknown option -> ValueError naming the valid ones) because a typo in a
run config such as ``tua=0`` would otherwise silently run with the default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from coordinator.aggregation.base import Strategy
from coordinator.aggregation.fedproto import FedProto
from coordinator.aggregation.group_fedavg import GroupFedAvg
from coordinator.aggregation.heterotune import HeteroTune
from coordinator.aggregation.local import LocalOnly
from coordinator.aggregation.noalign import HeteroTuneNoAlign

_FACTORIES: dict[str, type[Any]] = {
    HeteroTune.name: HeteroTune,
    HeteroTuneNoAlign.name: HeteroTuneNoAlign,
    GroupFedAvg.name: GroupFedAvg,
    LocalOnly.name: LocalOnly,
    FedProto.name: FedProto,
}

STRATEGY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def strategy_options(name: str) -> tuple[str, ...]:
    """The keyword options ``make_strategy(name, ...)`` accepts."""
    return tuple(f.name for f in dataclasses.fields(_factory(name)) if f.init)


def _factory(name: str) -> type[Any]:
    try:
        return _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregation strategy {name!r}; valid names: {', '.join(STRATEGY_NAMES)}"
        ) from None


def make_strategy(name: str, **options: Any) -> Strategy:
    """Build the strategy called ``name`` with its options (e.g. ``tau=0.5`` for heterotune)."""
    factory = _factory(name)
    valid = strategy_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"strategy {name!r} has no option(s) {unknown}; valid options: {list(valid) or 'none'}"
        )
    strategy: Strategy = factory(**options)
    return strategy
