"""A method's own rule plus consensus distillation: the fleet (or each backbone group) averages its devices'
class probabilities on a shared public set, and every device then learns the consensus's labels.

Why: the pilot and the design search found the DeMA experts carry nothing measurable between backbones through
the r-space. Predictions on common inputs need no shared parameter space at all (FedMD, FedDF): a MiniLM-L3
and a MiniLM-L6 device, or DINOv2 at 4 and 12 blocks, can teach each other through what they predict. The
consensus travels as far as the run's scope says (with_public_table.py); it is the sample-weighted mean of the
probability tables (``consensus``), a probability table again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.aggregation.base import ClientUpdate, Strategy
from coordinator.aggregation.with_public_table import WithPublicTable, table_mean, table_of
from protocols.distillation import DISTILL_PROBS


def checked_probabilities(update: ClientUpdate, shape: tuple[int, ...]) -> np.ndarray:
    """The update's probability table as float64, or a ValueError naming the agent and what is wrong with it."""
    table = table_of(update, DISTILL_PROBS, shape, "consensus distillation")
    if (table < 0).any() or not np.allclose(table.sum(axis=-1), 1.0, atol=1e-3):
        raise ValueError(f"update from agent {update.agent_id!r}: {DISTILL_PROBS!r} is not a table of class "
                         "probabilities (finite, >= 0, every row summing to 1); the update is rejected")
    return table


def consensus(updates: Sequence[ClientUpdate], shape: tuple[int, ...]) -> np.ndarray:
    """The n_k-weighted mean of the updates' probability tables (float32): a probability table again."""
    return table_mean(updates, shape, checked_probabilities)


def with_distillation(inner: Strategy) -> WithPublicTable:
    """``inner`` on the model tensors; the consensus where the state keeps it (global, or per group)."""
    return WithPublicTable(inner, DISTILL_PROBS, "distillation", checked_probabilities)
