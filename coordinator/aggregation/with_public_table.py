"""A method's own rule plus one table over the run's public set: the fleet (or each backbone group) averages its
devices' tables, row by row, and sends the mean back.

Two exchanges use it: consensus distillation's class probabilities (with_distillation.py) and public-set
anchoring's representations (with_anchors.py). Both are about the same public samples on every device, so they
cross backbones of any depth. The table travels as far as the run's ``scope`` says, which the state shows: in
the global tensors for "global" (every backbone, the cross-model design), in every group's tensors for "group"
(its fair baseline: the same exchange, within a backbone group only).

The table is split off: the inner rule aggregates everything else as it would without it, and the table's mean
is the sample-weighted mean of the devices' tables (each checked first by the exchange's own ``check``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.aggregation.base import AggregationResult, ClientUpdate, FederatedState, Strategy, TensorDict
from coordinator.aggregation.mean import updates_by_group, weighted_mean

# (update, expected shape) -> the update's table as float64, or a ValueError naming the agent
TableCheck = Callable[[ClientUpdate, tuple[int, ...]], np.ndarray]


def table_of(update: ClientUpdate, name: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """The update's ``name`` table as float64 after the checks every table needs (present, shape, finite)."""
    if name not in update.tensors:
        raise ValueError(f"update from agent {update.agent_id!r} lacks {name!r} ({what})")
    table = np.asarray(update.tensors[name], dtype=np.float64)
    if table.shape != shape:
        raise ValueError(f"update from agent {update.agent_id!r}: {name!r} has shape {table.shape}, "
                         f"expected {shape} (one row per public sample)")
    if not np.isfinite(table).all():
        raise ValueError(f"update from agent {update.agent_id!r}: {name!r} holds a non-finite value; the update "
                         "is rejected")
    return table


def table_mean(updates: Sequence[ClientUpdate], shape: tuple[int, ...], check: TableCheck) -> np.ndarray:
    """The n_k-weighted mean of the updates' checked tables (float32)."""
    tables = [check(u, shape) for u in updates]
    return weighted_mean(tables, [float(u.num_samples) for u in updates]).astype(np.float32)


@dataclass(frozen=True)
class WithPublicTable:
    """``inner`` on the model tensors; the mean of the ``table`` tensor where the state keeps it (global, or per
    group). ``label`` names the exchange in the strategy's name and diagnostics."""

    inner: Strategy
    table: str
    label: str
    check: TableCheck

    @property
    def name(self) -> str:
        return f"{self.inner.name}+{self.label}"

    def aggregate(self, state: FederatedState, updates: Sequence[ClientUpdate], round_id: int) -> AggregationResult:
        model_state = FederatedState(self._model_part(state.global_tensors),
                                     {g: self._model_part(t) for g, t in state.group_tensors.items()})
        model_updates = [ClientUpdate(u.agent_id, u.group, u.num_samples, self._model_part(u.tensors))
                         for u in updates]
        result = self.inner.aggregate(model_state, model_updates, round_id)
        global_tensors = dict(result.state.global_tensors)
        groups = {g: dict(t) for g, t in result.state.group_tensors.items()}
        if self.table in state.global_tensors:
            scope = "global"
            global_tensors[self.table] = table_mean(updates, state.global_tensors[self.table].shape, self.check)
        else:
            scope = "group"
            for group, members in updates_by_group(updates).items():
                groups[group][self.table] = table_mean(members, state.group_tensors[group][self.table].shape,
                                                       self.check)
            for group, tensors in state.group_tensors.items():  # a group with no update keeps its table
                groups[group].setdefault(self.table, np.array(tensors[self.table], copy=True))
        return AggregationResult(FederatedState(global_tensors, groups),
                                 {**result.diagnostics, self.label: {"scope": scope}, "strategy": self.name})

    def _model_part(self, tensors: TensorDict) -> TensorDict:
        return {name: value for name, value in tensors.items() if name != self.table}
