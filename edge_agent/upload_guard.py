"""Which tensors an agent may send: never one its bundle marks ``local``, never one its bundle does not have.

The assignment says what to upload, and a forged or buggy one could ask for the device's private head or
private experts (the parts of the model that only this device's data shaped). The bundle manifest, which the
agent verified by its sha256, records each trainable tensor's scope, and that is what the agent goes by: a name
is uploadable if it is a manifest tensor whose scope is not ``local``, or one of the exchange-only tables that
are not part of the model (class prototypes, the distillation consensus, the public-set anchors).
"""

from __future__ import annotations

from collections.abc import Iterable

from edge_agent.local_round import is_exchange_only
from protocols.bundle_manifest import BundleManifest


def refused_upload_names(manifest: BundleManifest, names: Iterable[str]) -> dict[str, str]:
    """name -> why it must not be sent, for every name in ``names`` this device will not upload."""
    scopes = {t.name: t.scope for t in manifest.tensors}
    refused = {}
    for name in names:
        if is_exchange_only(name):
            continue
        scope = scopes.get(name)
        if scope is None:
            refused[name] = f"the {manifest.backbone} bundle has no tensor {name!r}"
        elif scope == "local":
            refused[name] = f"{name!r} is local to this device (its bundle's scope) and never leaves it"
    return refused
