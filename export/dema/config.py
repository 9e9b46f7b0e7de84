"""DeMA hyper-parameters, slot placement and the scope of every trainable tensor family.

Kept free of torch so the coordinator and the agent can reason about scopes without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

# Which trainable tensors travel, and to whom (docs/design.md, "The method").
SCOPES = ("global", "group", "local")
FAMILIES = ("ln", "w_in", "w_g", "experts", "private", "w_out", "head")
DEFAULT_SCOPES: Mapping[str, str] = {
    "ln": "group",
    "w_in": "group",
    "w_g": "global",
    "experts": "global",
    # Private experts (DemaConfig.private_experts, none by default) hold what only this device's data needs.
    "private": "local",
    "w_out": "group",
    # A shared head loses 13-15 points of personalised accuracy under label skew (pilot-dema.md).
    "head": "local",
}


@dataclass(frozen=True)
class DemaConfig:
    """Same for every backbone, so the global tensors have one shape fleet-wide."""

    rank: int = 64  # r: width of the shared space
    slots: int = 3  # S: adapters per backbone, position-aligned by relative depth
    experts: int = 4  # E: all active (dense)
    # P private experts beside the shared ones, never sent: they give a device somewhere to keep what only its own
    # data needs, so the shared experts need not bend towards it. Outside the gate, whose meaning is fleet-wide.
    private_experts: int = 0
    seed: int = 0  # initial values; global tensors get identical values on every backbone

    def __post_init__(self) -> None:
        if self.rank < 4 or self.rank % 4:
            raise ValueError(f"DeMA rank must be a positive multiple of 4, got {self.rank}")
        if self.slots < 1 or self.experts < 1:
            raise ValueError(f"DeMA needs slots >= 1 and experts >= 1, got {self.slots}, {self.experts}")
        if self.private_experts < 0:
            raise ValueError(f"DeMA private_experts must be >= 0, got {self.private_experts}")

    @property
    def expert_rank(self) -> int:
        """q = r / 4: each expert is a small bottleneck inside the shared space."""
        return self.rank // 4

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def slot_blocks(layers: int, slots: int) -> list[int]:
    """0-based block index each slot follows: slot s sits after block round(s * L / S), s = 1..S.

    Rounding is half-up (not Python's banker's rounding) so the placement is the one the spec states.
    """
    if layers < 1:
        raise ValueError(f"a backbone needs at least one block, got {layers}")
    return [max(1, math.floor(s * layers / slots + 0.5)) - 1 for s in range(1, slots + 1)]


def family_of(name: str) -> str:
    """Tensor family from a trainable parameter name, e.g. 'adapters.1.w_g.weight' -> 'w_g'."""
    parts = name.split(".")
    if parts[0] == "head":
        return "head"
    if parts[0] == "adapters" and len(parts) >= 3 and parts[2] in FAMILIES:
        return parts[2]
    raise ValueError(f"'{name}' is not a DeMA or head tensor; families are {', '.join(FAMILIES)}")


def resolve_scopes(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The scope of every family after a run's overrides, validated."""
    scopes = dict(DEFAULT_SCOPES)
    for family, scope in (overrides or {}).items():
        if family not in FAMILIES:
            raise ValueError(f"unknown tensor family '{family}' in scopes; known: {', '.join(FAMILIES)}")
        if scope not in SCOPES:
            raise ValueError(f"scope for '{family}' must be one of {', '.join(SCOPES)}, got '{scope}'")
        scopes[family] = scope
    return scopes


def shared_local_families(scopes: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The families a run's scopes share although they are ``local`` by default (e.g. a group-shared head), in a
    fixed order: the part of a run's scopes a bundle must carry (export/bundle.py, BundleRecipe)."""
    return tuple((family, scopes[family]) for family in FAMILIES
                 if DEFAULT_SCOPES[family] == "local" and scopes.get(family, "local") != "local")
