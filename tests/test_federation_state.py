"""The round-0 state: which tensors start where, and when sharing a family globally is refused.

Pinned on hand-made tensors and real manifests (the bundles' only role here is to hold initial values).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from coordinator.federation_state import initial_state
from coordinator.methods import scopes_for
from protocols.bundle_manifest import BundleManifest, TaskEntry, TensorEntry


@dataclass
class HeldBundle:
    manifest: BundleManifest
    tensors: dict[str, np.ndarray]

    def initial_tensors(self) -> dict[str, np.ndarray]:
        return self.tensors


def bundle(backbone: str, tensors: dict[str, np.ndarray]) -> HeldBundle:
    """A bundle holding these initial tensors, each at its family's export scope."""
    export_scope = {"experts": "global", "w_in": "group", "head": "local"}
    entries = []
    for name, value in tensors.items():
        family = name.split(".")[2] if name.startswith("adapters.") else "head"
        entries.append(TensorEntry(name=name, shape=value.shape, dtype="float32", family=family,
                                   scope=export_scope[family]))
    manifest = BundleManifest(backbone=backbone, hidden=4, layers=1, slot_blocks=(0,), dema={},
                              task=TaskEntry(name="t", labels=("a", "b"), max_length=8, batch_size=2),
                              tensors=tuple(entries), backbone_params=0, files={})
    return HeldBundle(manifest, tensors)


EXPERT = "adapters.0.experts.0.a.weight"
W_IN = "adapters.0.w_in.weight"


def test_global_group_and_local_tensors_start_where_their_scope_says() -> None:
    shared = np.arange(4, dtype=np.float32).reshape(2, 2)
    small = bundle("b-small", {EXPERT: shared, W_IN: np.ones((2, 4), np.float32), "head.weight": np.zeros((2, 4))})
    large = bundle("a-large", {EXPERT: shared.copy(), W_IN: np.full((2, 4), 2, np.float32),
                               "head.weight": np.ones((2, 4))})
    state = initial_state({"b-small": small, "a-large": large}, scopes_for("heterotune"))
    assert list(state.global_tensors) == [EXPERT]
    np.testing.assert_array_equal(state.global_tensors[EXPERT], shared)
    np.testing.assert_array_equal(state.group_tensors["b-small"][W_IN], np.ones((2, 4)))
    np.testing.assert_array_equal(state.group_tensors["a-large"][W_IN], np.full((2, 4), 2))
    assert all("head.weight" not in g for g in state.group_tensors.values())


def test_a_family_exported_global_must_start_identical() -> None:
    a = bundle("a", {EXPERT: np.zeros((2, 2), np.float32)})
    b = bundle("b", {EXPERT: np.ones((2, 2), np.float32)})
    with pytest.raises(ValueError, match="differs between backbones at export"):
        initial_state({"a": a, "b": b}, scopes_for("heterotune"))


def test_a_family_the_run_makes_global_starts_from_the_first_backbone_by_name() -> None:
    z = bundle("z-backbone", {"head.weight": np.full((2, 4), 9, np.float32)})
    a = bundle("a-backbone", {"head.weight": np.full((2, 4), 1, np.float32)})
    state = initial_state({"z-backbone": z, "a-backbone": a}, scopes_for("heterotune", {"head": "global"}))
    np.testing.assert_array_equal(state.global_tensors["head.weight"], np.full((2, 4), 1))


def test_a_global_family_must_have_one_shape_fleet_wide() -> None:
    narrow = bundle("narrow", {"head.weight": np.zeros((2, 4), np.float32)})
    wide = bundle("wide", {"head.weight": np.zeros((2, 8), np.float32)})
    with pytest.raises(ValueError, match=r"'head.weight' cannot be global: its shape is \(2, 4\).*\(2, 8\)"):
        initial_state({"narrow": narrow, "wide": wide}, scopes_for("heterotune", {"head": "global"}))
