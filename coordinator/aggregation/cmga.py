"""Cross-Model Gradient Alignment (CMGA): the pure math on group pseudo-gradients of one tensor.

Given one global tensor's group pseudo-gradients ``G_b`` (see ``mean.group_pseudo_gradients``):

1. Conflict projection (PCGrad-style, across backbone groups instead of tasks). For each group
   ``b``, for each other group ``c`` in a seeded order: if ``<G_b, G_c> < 0`` then
   ``G_b <- G_b - (<G_b, G_c> / |G_c|^2) G_c``. The projection is against the *original* ``G_c``
   (what group c actually asked for, so the result for b does not depend on the order in which
   groups are processed), applied sequentially to the running ``G_b`` (so a later projection sees
   the earlier ones; the order among c's matters and is therefore seeded and recorded). A ``G_c``
   with zero norm is skipped (no direction to project on).
2. Optional norm harmonisation: rescale every non-zero projected ``G_b`` to the median of the
   non-zero projected norms, so that a backbone whose updates are simply larger (e.g. a wider
   model, a higher learning rate) does not dominate the shared tensors.
3. Combination: ``sum_b w_b G_b`` with ``w_b ∝ (sum_{k in b} n_k)^tau`` normalised to sum 1.
   tau = 1 weights groups by data (then, without conflicts, the step equals plain FedAvg over all
   agents); tau = 0 weights every backbone equally.

With one group there is nothing to project against and w = 1, so CMGA is exactly FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def seeded_orders(groups: Sequence[str], seed: int, round_id: int) -> dict[str, list[str]]:
    """The order in which each group is projected against the others, for one round.

    One generator ``np.random.default_rng(seed + round_id)`` per round; groups are visited in
    sorted order and each draws ``rng.permutation(len(others))`` over its other groups in sorted
    order. The same orders apply to every global tensor of the round, which keeps the round
    reproducible from (seed, round_id) alone, e.g. after ``coordinator run --resume``.
    """
    if seed + round_id < 0:
        raise ValueError(f"seed + round_id must be >= 0, got {seed} + {round_id}")
    rng = np.random.default_rng(seed + round_id)
    ordered = sorted(groups)
    orders: dict[str, list[str]] = {}
    for group in ordered:
        others = [g for g in ordered if g != group]
        orders[group] = [others[int(i)] for i in rng.permutation(len(others))]
    return orders


def project_conflicts(
    grads: Mapping[str, np.ndarray], orders: Mapping[str, Sequence[str]]
) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Step 1: returns the projected ``G_b`` per group and the (b, c) projections that fired.

    Reads only the original ``grads`` when projecting, so no group sees another's projected vector.
    """
    projected: dict[str, np.ndarray] = {}
    fired: list[tuple[str, str]] = []
    for b in sorted(grads):
        running = np.array(grads[b], dtype=np.float64, copy=True)
        for c in orders[b]:
            original_c = np.asarray(grads[c], dtype=np.float64)
            squared_norm = float(np.vdot(original_c, original_c))
            if squared_norm == 0.0:
                continue
            dot = float(np.vdot(running, original_c))
            if dot < 0.0:
                running = running - (dot / squared_norm) * original_c
                fired.append((b, c))
        projected[b] = running
    return projected, fired


def harmonise_norms(grads: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Step 2: rescale each non-zero ``G_b`` to the median non-zero norm; returns vectors and scales.

    Zero vectors stay zero (scale 1.0) and do not enter the median.
    """
    group_norms = {g: float(np.linalg.norm(v)) for g, v in grads.items()}
    nonzero = [n for n in group_norms.values() if n > 0.0]
    if not nonzero:
        return {g: np.array(v, dtype=np.float64, copy=True) for g, v in grads.items()}, dict.fromkeys(
            grads, 1.0
        )
    target = float(np.median(nonzero))
    scales = {g: (target / n if n > 0.0 else 1.0) for g, n in group_norms.items()}
    return {g: np.asarray(v, dtype=np.float64) * scales[g] for g, v in grads.items()}, scales


def group_weights(counts: Mapping[str, int], tau: float) -> dict[str, float]:
    """Step 3 weights: ``w_b = N_b^tau / sum_c N_c^tau`` (computed in log space, no overflow)."""
    if not counts:
        return {}
    if any(n <= 0 for n in counts.values()):
        raise ValueError(f"group sample counts must be > 0, got {dict(counts)}")
    logs = {g: tau * math.log(n) for g, n in counts.items()}
    top = max(logs.values())
    raw = {g: math.exp(v - top) for g, v in logs.items()}
    total = sum(raw.values())
    return {g: v / total for g, v in raw.items()}


def combine(grads: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """``sum_b w_b G_b`` in float64 (groups summed in sorted order for reproducibility)."""
    groups = sorted(grads)
    if not groups:
        raise ValueError("combine: no group pseudo-gradients")
    total = np.zeros(np.shape(grads[groups[0]]), dtype=np.float64)
    for g in groups:
        total += weights[g] * np.asarray(grads[g], dtype=np.float64)
    return total


@dataclass(frozen=True)
class CMGAStep:
    """Result of CMGA on one tensor: the combined step (before eta_s) and what happened."""

    step: np.ndarray
    projected: dict[str, np.ndarray]
    fired: list[tuple[str, str]]
    scales: dict[str, float] | None


def cmga_step(
    grads: Mapping[str, np.ndarray],
    orders: Mapping[str, Sequence[str]],
    weights: Mapping[str, float],
    *,
    harmonise: bool = False,
) -> CMGAStep:
    """Steps 1-3 on one tensor's group pseudo-gradients."""
    projected, fired = project_conflicts(grads, orders)
    scales: dict[str, float] | None = None
    if harmonise:
        projected, scales = harmonise_norms(projected)
    return CMGAStep(step=combine(projected, weights), projected=projected, fired=fired, scales=scales)
