"""What a federation shares, derived from the bundles and a method's scopes: one pure helper for every path.

Why a module of its own: the MQTT round engine and the in-process benchmark runner (bench/methods.py) must
start from the same tensors, ask agents for the same uploads and send each backbone group the same weights, or
a benchmark would measure a different federation from the one the product runs. Both derive these three
things here from (bundle manifests + initial tensors, family -> scope map); nothing in this module does I/O
beyond reading a bundle's initial tensors through the object it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from coordinator.aggregation.base import FederatedState, TensorDict
from protocols.anchors import anchor_shapes, is_anchor_name
from protocols.bundle_manifest import BundleManifest
from protocols.distillation import distillation_shapes, is_distillation_name
from protocols.prototypes import is_prototype_name, prototype_shapes

SHARED_SCOPES = ("global", "group")
BYTES_PER_FLOAT32 = 4


class BundleLike(Protocol):
    """What this module needs of an ``export.bundle.Bundle`` (so tests can pass lighter objects)."""

    @property
    def manifest(self) -> BundleManifest: ...

    def initial_tensors(self) -> dict[str, np.ndarray]: ...


def names_in_scope(manifest: BundleManifest, scopes: Mapping[str, str], scope: str) -> list[str]:
    """Trainable tensor names of one backbone whose family has ``scope`` under the run's scope map.

    The run's map decides (not the scope recorded at export): a method such as group-fedavg turns the
    exported global families into group ones without rebuilding bundles.
    """
    return [t.name for t in manifest.tensors if scopes[t.family] == scope]


def prototypes_of(manifest: BundleManifest) -> dict[str, tuple[int, ...]]:
    """FedProto's prototype tensors for this bundle's task and DeMA r-space (protocols/prototypes.py)."""
    return prototype_shapes(len(manifest.task.labels), int(manifest.dema["rank"]))


def public_table_shapes(manifest: BundleManifest, public_samples: int, public_kind: str = "distill"
                        ) -> dict[str, tuple[int, ...]]:
    """The table a run exchanges over its ``public_samples`` public samples (none without a public set):
    class probabilities (P, classes) for ``public_kind`` "distill", representations (P, r) for "anchor"."""
    if public_kind == "anchor":
        return anchor_shapes(public_samples, int(manifest.dema["rank"]))
    if public_kind == "distill":
        return distillation_shapes(public_samples, len(manifest.task.labels))
    raise ValueError(f"unknown public exchange {public_kind!r}; expected 'distill' or 'anchor'")


def upload_names(manifest: BundleManifest, scopes: Mapping[str, str], *, prototypes: bool = False,
                 public_samples: int = 0, public_kind: str = "distill") -> list[str]:
    """What an agent on this backbone uploads each round: every global and group tensor, with ``prototypes``
    (fedproto) its class prototypes and their counts, and with ``public_samples`` its table over the public set
    (``public_kind``: class probabilities for distillation, representations for anchoring), sorted."""
    names = names_in_scope(manifest, scopes, "global") + names_in_scope(manifest, scopes, "group")
    names += list(prototypes_of(manifest)) if prototypes else []
    names += list(public_table_shapes(manifest, public_samples, public_kind))
    return sorted(names)


def tensor_shape(manifest: BundleManifest, name: str, *, public_samples: int = 0, public_kind: str = "distill"
                 ) -> tuple[int, ...]:
    """The shape of anything an agent on this backbone may upload: a trainable tensor, a prototype tensor or
    the run's public table (on its ``public_samples`` public samples)."""
    if is_distillation_name(name) or is_anchor_name(name):
        shapes = public_table_shapes(manifest, public_samples, public_kind)
        if name not in shapes:
            raise KeyError(f"{name!r} is not sent in this run (its public exchange: {public_kind}, "
                           f"{public_samples} public samples)")
        return shapes[name]
    if is_prototype_name(name):
        shapes = prototypes_of(manifest)
        if name not in shapes:
            raise KeyError(f"{name!r} is not a prototype tensor of this task ({len(manifest.task.labels)} classes)")
        return shapes[name]
    return tuple(manifest.tensor(name).shape)


def initial_state(bundles: Mapping[str, BundleLike], scopes: Mapping[str, str], *,
                  prototypes: bool = False, public_samples: int = 0, public_scope: str = "global",
                  public_kind: str = "distill") -> FederatedState:
    """The round-0 state: global tensors once, group tensors per backbone (an empty dict when there are none).

    Tensors exported as global must start identical on every backbone (export seeds them by name); a mismatch
    means the bundles were built with different DeMA configs or seeds, and averaging them would be meaningless,
    so it is an error rather than a silent pick. A family the *run* promotes to global (e.g. a shared head) was
    seeded per backbone at export: the fleet starts from the first backbone's values (by name), which every agent
    receives before its first step. Its shape must be the same on every backbone.

    With ``prototypes`` (fedproto) the global tensors also hold every class's prototype at zero with count 0,
    i.e. "no prototype yet": agents train with plain cross-entropy until a class has one. The r-space must be
    the same on every backbone.

    With ``public_samples`` the state holds the run's public table (``public_kind``: the distillation
    consensus or the anchors) at zero, "none yet", in ``public_scope``: "global" (one table over the fleet) or
    "group" (one per backbone group). Every backbone must give it the same shape (one label set; one r-space).
    """
    global_tensors: TensorDict = {}
    groups: dict[str, TensorDict] = {}
    for backbone in sorted(bundles):
        bundle = bundles[backbone]
        initial = bundle.initial_tensors()
        manifest = bundle.manifest
        groups[backbone] = {n: np.array(initial[n], copy=True) for n in names_in_scope(manifest, scopes, "group")}
        for name in names_in_scope(manifest, scopes, "global"):
            if name not in global_tensors:
                global_tensors[name] = np.array(initial[name], copy=True)
            elif global_tensors[name].shape != initial[name].shape:
                raise ValueError(f"'{name}' cannot be global: its shape is {global_tensors[name].shape} on one "
                                 f"backbone and {initial[name].shape} on {backbone}; give its family the group "
                                 "or local scope")
            elif manifest.tensor(name).scope == "global" and not np.array_equal(global_tensors[name], initial[name]):
                raise ValueError(f"global tensor '{name}' differs between backbones at export; "
                                 "rebuild the bundles with one DeMA config and seed")
    if prototypes:
        shapes = {backbone: prototypes_of(bundles[backbone].manifest) for backbone in sorted(bundles)}
        first = next(iter(shapes.values()), {})
        if any(s != first for s in shapes.values()):
            raise ValueError("fedproto needs one prototype space: the bundles differ in classes or DeMA rank ("
                             + ", ".join(f"{b}: r = {bundles[b].manifest.dema['rank']}" for b in shapes) + ")")
        global_tensors.update({name: np.zeros(shape, np.float32) for name, shape in first.items()})
    if public_samples > 0:
        tables = {backbone: public_table_shapes(bundles[backbone].manifest, public_samples, public_kind)
                  for backbone in sorted(bundles)}
        distinct = {tuple(t.items()) for t in tables.values()}
        if len(distinct) != 1 or public_scope not in SHARED_SCOPES:
            raise ValueError(f"the public exchange ({public_kind}) needs one table shape on every backbone "
                             f"({', '.join(f'{b}: {t}' for b, t in tables.items())}) and a shared scope, one of "
                             f"{SHARED_SCOPES} (got {public_scope!r})")
        zero = {n: np.zeros(shape, np.float32) for n, shape in distinct.pop()}
        for tensors in ([global_tensors] if public_scope == "global" else list(groups.values())):
            tensors.update({n: v.copy() for n, v in zero.items()})
    return FederatedState(global_tensors=global_tensors, group_tensors=groups)


def weights_for(state: FederatedState, backbone: str) -> TensorDict:
    """The tensors a backbone group receives at the start of a round: the global ones plus its group's."""
    return {**state.global_tensors, **state.group_tensors.get(backbone, {})}


def payload_bytes(manifest: BundleManifest, names: list[str], *, public_samples: int = 0,
                  public_kind: str = "distill") -> int:
    """Raw float32 bytes of the named tensors (without any container or transport framing)."""
    return BYTES_PER_FLOAT32 * sum(
        int(np.prod(tensor_shape(manifest, n, public_samples=public_samples, public_kind=public_kind)))
        for n in names)


def full_model_bytes(manifest: BundleManifest) -> int:
    """Raw float32 bytes of the whole model (frozen backbone + every trainable tensor): what full-model FedAvg
    would move per agent per direction per round, the reference for the communication fraction."""
    trainable = sum(int(np.prod(t.shape)) for t in manifest.tensors)
    return BYTES_PER_FLOAT32 * (manifest.backbone_params + trainable)
