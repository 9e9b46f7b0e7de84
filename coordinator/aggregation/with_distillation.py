"""A method's own rule plus consensus distillation: the fleet (or each backbone group) averages its devices'
class probabilities on a shared public set, and every device then learns the consensus's labels.

Why: the pilot and the design search found the DeMA experts carry nothing measurable between backbones through
the r-space. Predictions on common inputs need no shared parameter space at all (FedMD, FedDF): a MiniLM-L3
and a MiniLM-L6 device, or DINOv2 at 4 and 12 blocks, can teach each other through what they predict. The
consensus travels as far as the run's ``scope`` says: "global" (every backbone, the cross-model design) or
"group" (its fair baseline: the same exchange, within a backbone group only).

The distillation tensor (protocols/distillation.py) is split off: the inner rule aggregates everything else as it
would without it, and the consensus is the sample-weighted mean of the probability tables (``consensus``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.aggregation.base import AggregationResult, ClientUpdate, FederatedState, Strategy, TensorDict
from coordinator.aggregation.mean import updates_by_group, weighted_mean
from protocols.distillation import DISTILL_PROBS, is_distillation_name


def _model_part(tensors: TensorDict) -> TensorDict:
    return {name: value for name, value in tensors.items() if not is_distillation_name(name)}


def checked_probabilities(update: ClientUpdate, shape: tuple[int, ...]) -> np.ndarray:
    """The update's probability table as float64, or a ValueError naming the agent and what is wrong with it."""
    if DISTILL_PROBS not in update.tensors:
        raise ValueError(f"update from agent {update.agent_id!r} lacks {DISTILL_PROBS!r} (consensus distillation)")
    table = np.asarray(update.tensors[DISTILL_PROBS], dtype=np.float64)
    if table.shape != shape:
        raise ValueError(f"update from agent {update.agent_id!r}: {DISTILL_PROBS!r} has shape {table.shape}, "
                         f"expected {shape} (one row per public sample)")
    if not np.isfinite(table).all() or (table < 0).any() or not np.allclose(table.sum(axis=-1), 1.0, atol=1e-3):
        raise ValueError(f"update from agent {update.agent_id!r}: {DISTILL_PROBS!r} is not a table of class "
                         "probabilities (finite, >= 0, every row summing to 1); the update is rejected")
    return table


def consensus(updates: Sequence[ClientUpdate], shape: tuple[int, ...]) -> np.ndarray:
    """The n_k-weighted mean of the updates' probability tables (float32): a probability table again."""
    tables = [checked_probabilities(u, shape) for u in updates]
    return weighted_mean(tables, [float(u.num_samples) for u in updates]).astype(np.float32)


@dataclass(frozen=True)
class WithDistillation:
    """``inner`` on the model tensors; the consensus where the state keeps it (global, or per group)."""

    inner: Strategy

    @property
    def name(self) -> str:
        return f"{self.inner.name}+distillation"

    def aggregate(self, state: FederatedState, updates: Sequence[ClientUpdate], round_id: int) -> AggregationResult:
        model_state = FederatedState(_model_part(state.global_tensors),
                                     {g: _model_part(t) for g, t in state.group_tensors.items()})
        model_updates = [ClientUpdate(u.agent_id, u.group, u.num_samples, _model_part(u.tensors)) for u in updates]
        result = self.inner.aggregate(model_state, model_updates, round_id)
        global_tensors = dict(result.state.global_tensors)
        groups = {g: dict(t) for g, t in result.state.group_tensors.items()}
        if DISTILL_PROBS in state.global_tensors:
            scope = "global"
            global_tensors[DISTILL_PROBS] = consensus(updates, state.global_tensors[DISTILL_PROBS].shape)
        else:
            scope = "group"
            for group, members in updates_by_group(updates).items():
                groups[group][DISTILL_PROBS] = consensus(members, state.group_tensors[group][DISTILL_PROBS].shape)
            for group, tensors in state.group_tensors.items():  # a group with no update keeps its consensus
                groups[group].setdefault(DISTILL_PROBS, np.array(tensors[DISTILL_PROBS], copy=True))
        return AggregationResult(FederatedState(global_tensors, groups),
                                 {**result.diagnostics, "distillation": {"scope": scope},
                                  "strategy": self.name})
