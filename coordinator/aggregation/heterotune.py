"""``heterotune``: DeMA + CMGA, the default method.

Group-scope tensors: sample-weighted mean within each backbone group.
Global-scope tensors: CMGA (see :mod:`coordinator.aggregation.cmga`),
``theta <- theta + eta_s * sum_b w_b G_b`` with the group pseudo-gradients ``G_b`` projected off
each other where they conflict.

Why pseudo-gradients and not a mean of weights: the conflict test needs directions of change
relative to the common starting point ``theta``, and the server step size ``eta_s`` only makes
sense on a delta. With ``eta_s = 1`` and no conflicts, the update is group-balanced FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator.aggregation.base import (
    AggregationResult,
    ClientUpdate,
    FederatedState,
    validate_updates,
)
from coordinator.aggregation.cmga import cmga_step, group_weights, seeded_orders
from coordinator.aggregation.mean import (
    as_float32,
    group_means,
    group_pseudo_gradients,
    norms,
    pairwise_cosines,
    sample_counts,
    updates_by_group,
)


@dataclass(frozen=True)
class HeteroTune:
    """CMGA on global tensors, group mean on group tensors.

    tau: group weight exponent, ``w_b ∝ (sum_{k in b} n_k)^tau`` (1 = by data, 0 = per backbone).
    eta_s: server step size on the combined pseudo-gradient.
    seed: with ``round_id`` seeds the per-round projection order (reproducible on resume).
    harmonise_norms: rescale each projected ``G_b`` to the median group norm before combining.
    """

    name: ClassVar[str] = "heterotune"
    tau: float = 1.0
    eta_s: float = 1.0
    seed: int = 0
    harmonise_norms: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.tau):
            raise ValueError(f"heterotune: tau must be finite, got {self.tau}")
        if not (math.isfinite(self.eta_s) and self.eta_s > 0):
            raise ValueError(f"heterotune: eta_s must be finite and > 0, got {self.eta_s}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"heterotune: seed must be an int >= 0, got {self.seed!r}")

    def aggregate(
        self, state: FederatedState, updates: Sequence[ClientUpdate], round_id: int
    ) -> AggregationResult:
        validate_updates(state, updates)
        by_group = updates_by_group(updates)
        counts = sample_counts(by_group)
        weights = group_weights(counts, self.tau)
        orders = seeded_orders(list(by_group), self.seed, round_id)

        new_global = {}
        per_tensor: dict[str, dict[str, Any]] = {}
        for name, theta in state.global_tensors.items():
            if not by_group:
                new_global[name] = np.asarray(theta, dtype=np.float64)
                continue
            grads = group_pseudo_gradients(theta, by_group, name)
            outcome = cmga_step(grads, orders, weights, harmonise=self.harmonise_norms)
            new_global[name] = np.asarray(theta, dtype=np.float64) + self.eta_s * outcome.step
            info: dict[str, Any] = {
                "cosines": pairwise_cosines(grads),
                "projections": [[b, c] for b, c in outcome.fired],
                "norms": norms(grads),
                "projected_norms": norms(outcome.projected),
            }
            if outcome.scales is not None:
                info["scales"] = outcome.scales
            per_tensor[name] = info

        new_state = FederatedState(
            global_tensors=as_float32(new_global), group_tensors=group_means(state, by_group)
        )
        diagnostics: dict[str, Any] = {
            "strategy": self.name,
            "round_id": round_id,
            "num_updates": len(updates),
            "group_samples": counts,
            "group_weights": weights,
            "orders": orders,
            "num_projections": sum(len(t["projections"]) for t in per_tensor.values()),
            "tensors": per_tensor,
        }
        return AggregationResult(state=new_state, diagnostics=diagnostics)
