"""How each federated method maps onto tensor scopes, so every method runs from the same bundles.

A method is an aggregation rule plus which tensor families travel and how far. A run's own `scopes` override
these defaults family by family.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from coordinator.aggregation import make_strategy
from coordinator.aggregation.base import Strategy
from coordinator.aggregation.dp import DifferentiallyPrivate
from coordinator.aggregation.with_anchors import with_anchors
from coordinator.aggregation.with_distillation import with_distillation
from coordinator.aggregation.with_prototypes import WithPrototypes
from coordinator.config import RunConfig, privacy_plan
from export.dema.config import FAMILIES, resolve_scopes

METHOD_SCOPES: Mapping[str, Mapping[str, str]] = {
    "heterotune": {},
    "heterotune-noalign": {},
    # Sharing stays within a backbone group: the would-be global families become group-scoped.
    "group-fedavg": {"w_g": "group", "experts": "group"},
    "local": {family: "local" for family in FAMILIES},
    "fedproto": {family: "local" for family in FAMILIES},
}


# Methods whose agents always send class prototypes (and train towards the global ones); any other method
# does so too when the run sets `share_prototypes`.
PROTOTYPE_METHODS = frozenset({"fedproto"})


def uses_prototypes(config: RunConfig) -> bool:
    return config.method in PROTOTYPE_METHODS or config.share_prototypes


def prototype_weight_for(config: RunConfig) -> float:
    """The lambda a round's Assignment carries: the run's pull where it uses prototypes, else 0 (no term)."""
    return config.prototype_weight if uses_prototypes(config) else 0.0


def anchor_weight_for(config: RunConfig) -> float:
    """The anchor weight a round's Assignment carries: the run's where it anchors, else 0 (no term)."""
    return config.anchor_weight if config.anchor_steps else 0.0


def distillation_scope(config: RunConfig) -> str | None:
    """How far the consensus travels: as far as the run's experts do (global for heterotune, group for
    group-fedavg), or None without distillation. A method that shares no experts has no fleet to agree with."""
    return _public_scope(config, config.distill_steps, "distill_steps", "a consensus to distil from")


def anchoring_scope(config: RunConfig) -> str | None:
    """How far the anchors travel: as far as the run's experts do, or None without anchoring (why align the
    r-space of devices that share no experts?)."""
    return _public_scope(config, config.anchor_steps, "anchor_steps", "experts to align the r-space for")


def _public_scope(config: RunConfig, steps: int, option: str, what: str) -> str | None:
    if steps == 0:
        return None
    scope = scopes_for(config.method, config.scopes)["experts"]
    if scope == "local":
        raise ValueError(f"method {config.method!r} shares no experts, so it has no {what}; use {option} = 0 or "
                         "a sharing method")
    return scope


def public_kind_for(config: RunConfig) -> str:
    """Which table a run exchanges over its public set: "anchor" (representations) or "distill" (class
    probabilities, also the answer for a run without a public exchange)."""
    return "anchor" if config.anchor_steps > 0 else "distill"


def public_scope_for(config: RunConfig) -> str:
    """How far the run's public table travels ("global" when it has none: the value is then never used)."""
    return distillation_scope(config) or anchoring_scope(config) or "global"


def public_samples_for(config: RunConfig) -> int:
    """The public-set size a federation exchanges a table over: the run's when it distils or anchors, else 0
    (a run may name a public set and use neither). Engine, benchmark and demo all ask here."""
    return config.public_samples if distillation_scope(config) or anchoring_scope(config) else 0


def strategy_for(config: RunConfig) -> Strategy:
    """The run's aggregation rule: its method's, wrapped to also average prototypes when the run shares them,
    the public set's class probabilities when it distils and its representations when it anchors, and made
    client-level differentially private when the run has a ``[privacy]`` table."""
    strategy = make_strategy(config.method, **config.method_options)
    if config.share_prototypes and config.method not in PROTOTYPE_METHODS:
        strategy = WithPrototypes(strategy)
    if distillation_scope(config) is not None:
        strategy = with_distillation(strategy)
    if anchoring_scope(config) is not None:
        strategy = with_anchors(strategy)
    plan = privacy_plan(config)
    if plan is not None and config.privacy is not None:
        # The noise seed is the coordinator's secret: drawn here, once per coordinator, unless pinned for a benchmark.
        seed = config.privacy.noise_seed if config.privacy.noise_seed is not None else secrets.randbits(63)
        strategy = DifferentiallyPrivate(strategy, plan, seed)
    return strategy


def scopes_for(method: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Family -> scope for a method, after the run's overrides."""
    return resolve_scopes({**METHOD_SCOPES.get(method, {}), **(overrides or {})})
