"""Small pure helpers shared by the strategies (weighted means, grouping, copying, cosines).

Everything here computes in float64 and never mutates its inputs; the strategies cast back to
float32 only when they build the returned state, so rounding happens once per round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from coordinator.aggregation.base import ClientUpdate, FederatedState, TensorDict


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_i w_i a_i / sum_i w_i`` in float64.

    Weights must be non-negative with a positive sum; they need not be normalised (sample counts
    are passed as they are).
    """
    if len(arrays) != len(weights):
        raise ValueError(f"weighted_mean: {len(arrays)} arrays but {len(weights)} weights")
    if not arrays:
        raise ValueError("weighted_mean: nothing to average")
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"weighted_mean: weights must be finite and >= 0, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weighted_mean: weights sum to zero")
    shape = np.shape(arrays[0])
    acc = np.zeros(shape, dtype=np.float64)
    for array, weight in zip(arrays, weights, strict=True):
        if np.shape(array) != shape:
            raise ValueError(f"weighted_mean: shape {np.shape(array)} differs from {shape}")
        acc += float(weight) * np.asarray(array, dtype=np.float64)
    return acc / total


def as_float32(tensors: Mapping[str, np.ndarray]) -> TensorDict:
    """Fresh float32 copies (never views of the inputs, so callers cannot alias state)."""
    return {name: np.array(value, dtype=np.float32, copy=True) for name, value in tensors.items()}


def copy_state(state: FederatedState) -> FederatedState:
    """Deep copy of a state as float32."""
    return FederatedState(
        global_tensors=as_float32(state.global_tensors),
        group_tensors={group: as_float32(tensors) for group, tensors in state.group_tensors.items()},
    )


def updates_by_group(updates: Iterable[ClientUpdate]) -> dict[str, list[ClientUpdate]]:
    """Updates bucketed by backbone group; keys sorted so iteration order is deterministic."""
    buckets: dict[str, list[ClientUpdate]] = {}
    for update in updates:
        buckets.setdefault(update.group, []).append(update)
    return {group: buckets[group] for group in sorted(buckets)}


def sample_counts(by_group: Mapping[str, Sequence[ClientUpdate]]) -> dict[str, int]:
    """``sum_{k in b} n_k`` per group."""
    return {group: sum(u.num_samples for u in members) for group, members in by_group.items()}


def mean_of_updates(updates: Sequence[ClientUpdate], name: str) -> np.ndarray:
    """Sample-weighted mean of tensor ``name`` over ``updates`` (float64)."""
    return weighted_mean([u.tensors[name] for u in updates], [u.num_samples for u in updates])


def group_means(
    state: FederatedState, by_group: Mapping[str, Sequence[ClientUpdate]]
) -> dict[str, TensorDict]:
    """The group-scope rule, returned as a new ``group_tensors`` (float32).

    ``theta_g <- sum_{k in g} n_k theta_k / sum_{k in g} n_k`` for every group with at least one
    update; groups without an update this round keep their tensors unchanged.
    """
    result: dict[str, TensorDict] = {}
    for group, tensors in state.group_tensors.items():
        members = by_group.get(group, ())
        if members:
            result[group] = as_float32({name: mean_of_updates(members, name) for name in tensors})
        else:
            result[group] = as_float32(tensors)
    return result


def group_pseudo_gradients(
    theta: np.ndarray, by_group: Mapping[str, Sequence[ClientUpdate]], name: str
) -> dict[str, np.ndarray]:
    """``G_b = sum_{k in b} n_k (theta_k - theta) / sum_{k in b} n_k`` per group (float64).

    Equal to the group's weighted mean of theta_k minus theta, which is how it is computed (one
    subtraction per group instead of one per agent).
    """
    base = np.asarray(theta, dtype=np.float64)
    return {group: mean_of_updates(members, name) - base for group, members in by_group.items()}


def pair_key(a: str, b: str) -> str:
    """Key for an unordered group pair in diagnostics, e.g. ``"minilm-l3|minilm-l6"``."""
    first, second = sorted((a, b))
    return f"{first}|{second}"


def cosine(u: np.ndarray, v: np.ndarray) -> float | None:
    """Cosine of two tensors viewed as flat vectors; None when either is zero (undefined)."""
    nu = float(np.linalg.norm(u))
    nv = float(np.linalg.norm(v))
    if nu == 0.0 or nv == 0.0:
        return None
    return float(np.vdot(u, v)) / (nu * nv)


def pairwise_cosines(vectors: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """Cosine for every unordered pair of groups, keyed by :func:`pair_key`."""
    groups = sorted(vectors)
    return {
        pair_key(a, b): cosine(vectors[a], vectors[b]) for i, a in enumerate(groups) for b in groups[i + 1 :]
    }


def norms(vectors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Frobenius norm per group (diagnostics)."""
    return {group: float(np.linalg.norm(v)) for group, v in vectors.items()}
