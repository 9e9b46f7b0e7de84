"""A strategy decorator that makes any model-averaging rule client-level differentially private (DP-FedAvg).

Two steps, because the engine never holds a round's updates at once (streaming.GroupAccumulator keeps running
per-group sums):

- :meth:`DifferentiallyPrivate.clip` runs on each accepted update as it arrives (:func:`admit` is the engine's
  and the in-process runner's one call): the device's delta over the tensors that travel is clipped to norm C
  and the update re-expressed as ``theta + clipped delta`` with weight 1 (every device counts the same: a
  sample count would let one device's weight, and so its sensitivity, grow with its data);
- :meth:`DifferentiallyPrivate.aggregate` receives clipped updates (one per device, or one per group from the
  accumulator: their weight is then the group's device count), adds Gaussian noise of std ``z * C`` to each
  group's sum of clipped deltas, global and group tensors alike, and hands the inner rule one noisy mean per
  group. CMGA projects those noisy group means against each other and the group-mean rule keeps them: noise on
  per-group sums rather than one global sum is what lets CMGA still see a gradient per group, at the price of
  sqrt(groups) times the noise on the global tensors (docs/privacy.md).

The noise comes from :func:`coordinator.privacy.noise_generator` seeded by the coordinator's secret seed and the
round, so a strategy stays pure (no state between rounds) and a resumed round redraws the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.aggregation.base import AggregationResult, ClientUpdate, FederatedState, Strategy, validate_updates
from coordinator.aggregation.mean import updates_by_group
from coordinator.privacy import PrivacyPlan, clip_delta, noise_generator, noisy_sum

# Clipped updates pass through float32 on the wire of the accumulator's means; allow that rounding on the check.
_CLIP_SLACK = 1e-4


def _travelling(state: FederatedState, group: str) -> dict[str, np.ndarray]:
    return {**state.global_tensors, **state.group_tensors.get(group, {})}


@dataclass(frozen=True)
class DifferentiallyPrivate:
    """``inner`` on noisy group means of clipped deltas; ``plan`` holds C, z and the accounting."""

    inner: Strategy
    plan: PrivacyPlan
    noise_seed: int

    @property
    def name(self) -> str:
        return self.inner.name

    def clip(self, state: FederatedState, update: ClientUpdate) -> ClientUpdate:
        """The update with its delta clipped to ``plan.clip_norm`` and weight 1 (float64 tensors)."""
        reference = _travelling(state, update.group)
        if set(update.tensors) != set(reference):
            raise ValueError(f"update from agent {update.agent_id!r}: a private run clips exactly the travelling "
                             f"tensors {sorted(reference)}, got {sorted(update.tensors)}")
        deltas = {n: np.asarray(update.tensors[n], dtype=np.float64) - np.asarray(reference[n], dtype=np.float64)
                  for n in sorted(reference)}
        clipped, _ = clip_delta(deltas, self.plan.clip_norm)
        tensors = {n: np.asarray(reference[n], dtype=np.float64) + d for n, d in clipped.items()}
        return ClientUpdate(update.agent_id, update.group, 1, tensors)

    def aggregate(self, state: FederatedState, updates: Sequence[ClientUpdate], round_id: int) -> AggregationResult:
        validate_updates(state, updates)
        devices = sum(u.num_samples for u in updates)
        if devices > self.plan.per_round:
            raise ValueError(f"round {round_id} aggregates {devices} devices but the privacy accounting assumes at "
                             f"most {self.plan.per_round} a round (agents_per_round / privacy.population)")
        for u in updates:
            self._check_clipped(state, u)
        rng = noise_generator(self.noise_seed, round_id)
        noisy: list[ClientUpdate] = []
        for group, members in updates_by_group(updates).items():
            reference = _travelling(state, group)
            count = sum(u.num_samples for u in members)
            tensors: dict[str, np.ndarray] = {}
            for name in sorted(reference):
                theta = np.asarray(reference[name], dtype=np.float64)
                total = np.zeros(theta.shape, dtype=np.float64)
                for u in members:  # a member is one device (weight 1) or a group's mean (weight = its devices)
                    mean_delta = np.asarray(u.tensors[name], dtype=np.float64) - theta
                    total += u.num_samples * mean_delta
                tensors[name] = theta + noisy_sum(total, self.plan.noise_multiplier, self.plan.clip_norm, rng) / count
            noisy.append(ClientUpdate(f"dp:{group}", group, count, tensors))
        result = self.inner.aggregate(state, noisy, round_id)
        diagnostics: dict[str, Any] = dict(result.diagnostics)
        diagnostics["privacy"] = {
            **self.plan.spend().as_dict(), "clip_norm": self.plan.clip_norm, "delta": self.plan.delta,
            "devices": devices, "epsilon": self.plan.epsilon_after(round_id),
            "target_epsilon": self.plan.target_epsilon}
        return AggregationResult(state=result.state, diagnostics=diagnostics)

    def _check_clipped(self, state: FederatedState, update: ClientUpdate) -> None:
        """Refuse an update whose (mean) delta exceeds C: it skipped :meth:`clip`, so the noise would not cover it.

        The tolerance allows the float32 rounding of the accumulator's group means (2^-24 of each coordinate).
        """
        reference = _travelling(state, update.group)
        squares = scale = 0.0
        for name, theta in reference.items():
            theta64 = np.asarray(theta, dtype=np.float64)
            squares += float(np.sum((np.asarray(update.tensors[name], dtype=np.float64) - theta64) ** 2))
            scale += float(np.vdot(theta64, theta64))
        norm, limit = math.sqrt(squares), self.plan.clip_norm * (1 + _CLIP_SLACK) + 1e-6 * math.sqrt(scale)
        if norm > limit:
            raise ValueError(f"update {update.agent_id!r} moves the tensors by {norm:.4g} > privacy.clip_norm = "
                             f"{self.plan.clip_norm:g}: it was not clipped (call admit() on every update)")


def admit(strategy: Strategy, state: FederatedState, update: ClientUpdate) -> ClientUpdate:
    """What an accepted update enters aggregation as: clipped under a private strategy, unchanged otherwise."""
    return strategy.clip(state, update) if isinstance(strategy, DifferentiallyPrivate) else update
