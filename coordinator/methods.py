"""How each federated method maps onto tensor scopes, so every method runs from the same bundles.

A method is an aggregation rule plus which tensor families travel and how far. A run's own `scopes` override
these defaults family by family.
"""

from __future__ import annotations

from collections.abc import Mapping

from export.dema.config import FAMILIES, resolve_scopes

METHOD_SCOPES: Mapping[str, Mapping[str, str]] = {
    "heterotune": {},
    "heterotune-noalign": {},
    # Sharing stays within a backbone group: the would-be global families become group-scoped.
    "group-fedavg": {"w_g": "group", "experts": "group"},
    "local": {family: "local" for family in FAMILIES},
    "fedproto": {family: "local" for family in FAMILIES},
}


# Methods whose agents also send class prototypes (and train towards the global ones).
PROTOTYPE_METHODS = frozenset({"fedproto"})


def uses_prototypes(method: str) -> bool:
    return method in PROTOTYPE_METHODS


def scopes_for(method: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Family -> scope for a method, after the run's overrides."""
    return resolve_scopes({**METHOD_SCOPES.get(method, {}), **(overrides or {})})
