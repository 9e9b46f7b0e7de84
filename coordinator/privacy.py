"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): the pure math and the accountant.

The mechanism, per round (docs/privacy.md):

1. every accepted update's delta ``theta_k - theta`` over the tensors that travel (global scope plus the
   device's group scope, one vector per device) is clipped to L2 norm ``C`` (:func:`clip_delta`);
2. per backbone group ``g`` and per travelling tensor, the clipped deltas are summed and Gaussian noise of std
   ``z * C`` is added to the sum (:func:`noisy_sum`); the noisy sum over the group's ``m_g`` participants is the
   group's noisy mean delta (noise std ``z * C / m_g`` on the mean);
3. the method's own rule (CMGA, group mean) runs on those noisy group means, which is post-processing.

A device contributes only to its own group's block of sums and with norm <= C, so the whole release of a round
(every group's sums, global and group tensors) has L2 sensitivity C when a device is added or removed and 2C
when its data is replaced. The engine selects a fixed number of devices per round, so the default accounting is
sampling without replacement under replace-one (``SampledWithoutReplacementDpEvent`` with noise multiplier
``z / 2``); Poisson sampling under add-or-remove (``PoissonSampledDpEvent`` with ``z``) is available to the
accountant for comparison. Participation counts per group are treated as public (they are what the coordinator
selected, not what the devices' data says), which replace-one adjacency allows.

Epsilon comes from Google's ``dp-accounting`` (RDP accountant), imported lazily: only the coordinator needs it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Sampling = Literal["fixed", "poisson"]

# RDP orders: dp-accounting's default fractional orders, integer orders to 32. Its default set also has 33-63 and
# 128-1024, whose sampling-without-replacement bound costs O(order^2) each (2 s an epsilon instead of 0.3 s here);
# any set of orders gives a valid bound, and orders above 32 only tighten it for budgets far below epsilon 1.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10 for x in range(1, 100)] + list(range(11, 33)))
# Noise multipliers searched when calibrating to a target epsilon; above the upper end no run learns anything.
_Z_BRACKET = (0.05, 1e4)


class PrivacyBudgetError(ValueError):
    """A run's planned (or, on resume, planned plus already spent) epsilon exceeds its budget."""


@dataclass(frozen=True)
class RoundSpend:
    """What one round released, as the accountant needs it (also what a committed round's diagnostics keep)."""

    noise_multiplier: float
    population: int
    per_round: int

    def as_dict(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "population": self.population,
                "per_round": self.per_round}


def _check_sampling(population: int, per_round: int) -> None:
    if population < 1 or not 1 <= per_round <= population:
        raise ValueError(f"need 1 <= per_round <= population, got per_round={per_round}, population={population}")


def _event(spend: RoundSpend, sampling: Sampling) -> Any:
    import dp_accounting as dpa

    _check_sampling(spend.population, spend.per_round)
    if sampling == "fixed":  # replace-one: the sum of clipped deltas moves by up to 2C, so z / 2 per sensitivity
        return dpa.SampledWithoutReplacementDpEvent(spend.population, spend.per_round,
                                                    dpa.GaussianDpEvent(spend.noise_multiplier / 2.0))
    if sampling == "poisson":  # add-or-remove: sensitivity C
        return dpa.PoissonSampledDpEvent(spend.per_round / spend.population,
                                         dpa.GaussianDpEvent(spend.noise_multiplier))
    raise ValueError(f"sampling must be 'fixed' or 'poisson', got {sampling!r}")


def _accountant(sampling: Sampling) -> Any:
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    relation = dpa.NeighboringRelation.REPLACE_ONE if sampling == "fixed" else \
        dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    return RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=relation)


def spent_epsilon(spends: Iterable[RoundSpend], delta: float, sampling: Sampling = "fixed") -> float:
    """Epsilon at ``delta`` of the composition of the given rounds (0 for none); rounds may differ in z or q."""
    import dp_accounting as dpa

    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    counted: dict[RoundSpend, int] = {}
    for spend in spends:
        counted[spend] = counted.get(spend, 0) + 1
    if not counted:
        return 0.0
    if any(s.noise_multiplier <= 0 for s in counted):
        return math.inf
    accountant = _accountant(sampling)
    accountant.compose(dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(_event(s, sampling), n)
                                            for s, n in sorted(counted.items(), key=lambda kv: repr(kv[0]))]))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=1024)
def epsilon(noise_multiplier: float, rounds: int, delta: float, population: int, per_round: int,
            sampling: Sampling = "fixed") -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of noise multiplier ``z`` selecting ``per_round`` of
    ``population`` devices each round."""
    return spent_epsilon([RoundSpend(noise_multiplier, population, per_round)] * rounds, delta, sampling)


@functools.lru_cache(maxsize=256)
def calibrate_noise(target_epsilon: float, rounds: int, delta: float, population: int, per_round: int,
                    sampling: Sampling = "fixed") -> float:
    """The smallest noise multiplier whose ``rounds`` rounds stay within ``target_epsilon`` at ``delta``.

    dp-accounting's Brent search returns a z within 1e-4 of the boundary; a last check keeps the promise exact (a z
    slightly above, never below, what the budget allows). Cached: a configuration is validated more than once.
    """
    import dp_accounting as dpa

    _check_sampling(population, per_round)
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    low, high = _Z_BRACKET
    if epsilon(high, rounds, delta, population, per_round, sampling) > target_epsilon:
        raise PrivacyBudgetError(f"no noise multiplier up to {high:g} keeps {rounds} rounds within epsilon "
                                 f"{target_epsilon:g} at delta {delta:g}")
    if epsilon(low, rounds, delta, population, per_round, sampling) <= target_epsilon:
        return low

    def event(z: float) -> Any:
        return dpa.SelfComposedDpEvent(_event(RoundSpend(z, population, per_round), sampling), rounds)

    z = float(dpa.calibrate_dp_mechanism(lambda: _accountant(sampling), event, target_epsilon, delta,
                                         dpa.ExplicitBracketInterval(low, high), tol=1e-4))
    while epsilon(z, rounds, delta, population, per_round, sampling) > target_epsilon:
        z += 1e-4
    return z


@dataclass(frozen=True)
class PrivacyPlan:
    """A run's mechanism and what its planned rounds spend; built from a configuration by :func:`plan`."""

    clip_norm: float
    noise_multiplier: float
    delta: float
    population: int
    per_round: int
    rounds: int
    target_epsilon: float
    planned_epsilon: float

    def spend(self) -> RoundSpend:
        return RoundSpend(self.noise_multiplier, self.population, self.per_round)

    def epsilon_after(self, rounds: int) -> float:
        return epsilon(self.noise_multiplier, rounds, self.delta, self.population, self.per_round)


def plan(*, clip_norm: float, target_epsilon: float, delta: float, population: int, per_round: int, rounds: int,
         noise_multiplier: float | None) -> PrivacyPlan:
    """Check a configuration's budget before anything runs: refuse it (naming the fields) if ``rounds`` rounds at
    the configured ``privacy.noise_multiplier`` would spend more than ``privacy.target_epsilon``; with no noise
    multiplier configured, calibrate one that spends exactly the budget."""
    if per_round > population:
        raise PrivacyBudgetError(
            f"agents_per_round = {per_round} is above privacy.population = {population}: the accountant's sampling "
            "rate would exceed 1; set privacy.population to the number of devices rounds select from")
    if noise_multiplier is None:
        z = calibrate_noise(target_epsilon, rounds, delta, population, per_round)
    else:
        z = noise_multiplier
        spent = epsilon(z, rounds, delta, population, per_round)
        if spent > target_epsilon:
            fits = calibrate_noise(target_epsilon, rounds, delta, population, per_round)
            raise PrivacyBudgetError(
                f"privacy budget exhausted: rounds = {rounds} at privacy.noise_multiplier = {z:g}, selecting "
                f"{per_round} of privacy.population = {population} devices a round, spend epsilon = {spent:.3g} at "
                f"privacy.delta = {delta:g}, above privacy.target_epsilon = {target_epsilon:g}; raise "
                f"privacy.noise_multiplier to >= {_round_up(fits):g}, lower rounds, or leave "
                "privacy.noise_multiplier unset to calibrate it to the budget")
    return PrivacyPlan(clip_norm, z, delta, population, per_round, rounds, target_epsilon,
                       epsilon(z, rounds, delta, population, per_round))


def _round_up(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits, rounded up (a suggested z must fit the budget as printed)."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


def check_resume(plan_: PrivacyPlan, committed: Sequence[RoundSpend]) -> float:
    """On resume: epsilon of the rounds already committed plus the rounds still to run at the current plan;
    refuse (naming the fields) if it exceeds the budget, e.g. after ``rounds`` or the noise was changed.
    Returns the epsilon the whole run will have spent."""
    remaining = max(0, plan_.rounds - len(committed))
    total = spent_epsilon([*committed, *[plan_.spend()] * remaining], plan_.delta)
    if total > plan_.target_epsilon:
        already = spent_epsilon(committed, plan_.delta)
        raise PrivacyBudgetError(
            f"privacy budget exhausted on resume: the {len(committed)} committed rounds spent epsilon = "
            f"{already:.3g} and the {remaining} remaining rounds (rounds = {plan_.rounds}, privacy.noise_multiplier "
            f"= {plan_.noise_multiplier:.4g}) would bring it to {total:.3g} at privacy.delta = {plan_.delta:g}, above "
            f"privacy.target_epsilon = {plan_.target_epsilon:g}; lower rounds or raise privacy.noise_multiplier")
    return total


def check_resumed_privacy(plan_: PrivacyPlan | None, diagnostics: Sequence[Mapping[str, Any]]) -> float | None:
    """The resume gate: None for a run without ``[privacy]``, else :func:`check_resume` on the committed rounds'
    recorded spends (``diagnostics``: one dict per committed round, oldest first)."""
    if plan_ is None:
        return None
    return check_resume(plan_, committed_spends(diagnostics))


def committed_spends(diagnostics: Iterable[Mapping[str, Any]]) -> list[RoundSpend]:
    """The spends a run's committed rounds recorded (their diagnostics' ``privacy`` entry), oldest first.

    A committed round without the entry released its aggregate without noise: it counts as infinite spend, so a
    run started without DP cannot be resumed as if it had been private all along.
    """
    spends = []
    for entry in diagnostics:
        info = entry.get("privacy")
        if not isinstance(info, Mapping):
            spends.append(RoundSpend(0.0, 1, 1))
            continue
        spends.append(RoundSpend(float(info["noise_multiplier"]), int(info["population"]), int(info["per_round"])))
    return spends


# --- the mechanism's math ------------------------------------------------------------------------------------


def clip_delta(deltas: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale one device's deltas (all its travelling tensors, one vector) to L2 norm at most ``clip_norm``.

    Returns the clipped deltas (float64) and the norm before clipping. The norm is over every tensor jointly:
    clipping each tensor to C would let a device move k tensors by C each, a sensitivity of C * sqrt(k).
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm}")
    as64 = {name: np.asarray(value, dtype=np.float64) for name, value in deltas.items()}
    norm = math.sqrt(sum(float(np.vdot(v, v)) for v in as64.values()))
    if not math.isfinite(norm):
        raise ValueError("update delta is not finite; it cannot be clipped")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: v * scale for name, v in as64.items()}, norm


def noisy_sum(total: np.ndarray, noise_multiplier: float, clip_norm: float, rng: np.random.Generator) -> np.ndarray:
    """``total + N(0, (z C)^2)`` per coordinate, drawn from the caller's generator (never global state)."""
    return np.asarray(total, dtype=np.float64) + rng.normal(0.0, noise_multiplier * clip_norm, np.shape(total))


def noise_generator(noise_seed: int, round_id: int) -> np.random.Generator:
    """A round's generator: a pure function of the coordinator's secret seed and the round (resumes redraw the same
    noise for the same round, and no two rounds share a stream)."""
    return np.random.default_rng([noise_seed, round_id])
