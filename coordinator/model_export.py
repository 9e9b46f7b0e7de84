"""`coordinator export`: the federation's model for a backbone group, as the same inference package a device exports.

Only possible when every trainable tensor of the group is shared (scope ``global`` or ``group``): with the default
``head = "local"`` every device keeps its own head, so the coordinator holds no head at all and there is no model to
export. The refusal says so and names both ways out.
"""

from __future__ import annotations

import time
from pathlib import Path

from coordinator.runner import build_bundles, resume_config
from coordinator.store import RunStore, load_state
from edge_agent.inference_package import ModelCard
from edge_agent.model_export import export_tensors
from export.dema.config import resolve_scopes


class FederationExportError(ValueError):
    """This run has no exportable model for the group asked for; the message says why and what to do."""


def export_federation_model(run_dir: Path, backbone: str, out: Path, *, int8: bool = False,
                            threads: int = 1) -> ModelCard:
    config = resume_config(run_dir)
    if backbone not in config.backbones:
        raise FederationExportError(f"run {run_dir} has no backbone '{backbone}'; its backbones are "
                                    f"{', '.join(config.backbones)}")
    scopes = resolve_scopes(config.scopes)
    if scopes["head"] == "local":
        raise FederationExportError(
            f"run {run_dir} trains a local head ([scopes] head = \"local\", the default): every device keeps its own "
            "classification head and never sends it, so the coordinator holds no head and there is no federation "
            "model to export. Either run with [scopes] head = \"group\" (or \"global\") in the run config, or "
            "export a device's own model on that device: edge-agent export --out DIR")
    bundle = build_bundles(config)[backbone]
    manifest = bundle.manifest
    local = sorted({t.family for t in manifest.tensors if scopes.get(t.family, t.scope) == "local"})
    if local:
        raise FederationExportError(f"run {run_dir} keeps the tensor families {local} on the devices (scope "
                                    "local), so the coordinator does not hold the whole model; make them \"group\" "
                                    "in [scopes], or export a device's own model (edge-agent export)")
    store = RunStore(run_dir)
    try:
        last, run_id = store.last_round(), str(store.meta("run_id") or run_dir.name)
        rows = [r for r in store.metrics() if r.round == last and r.backbone == backbone and r.accepted]
        path = store.tensors_path(last)
    finally:
        store.close()
    if last < 1 or not path.is_file():
        raise FederationExportError(f"run {run_dir} has no completed round yet; export after the first round")
    state = load_state(path)
    if backbone not in state.group_tensors:
        raise FederationExportError(f"no device trained {backbone} in run {run_dir}; nothing to export for it")
    wanted = {t.name for t in manifest.tensors}
    tensors = {n: v for n, v in {**state.global_tensors, **state.group_tensors[backbone]}.items() if n in wanted}

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else None

    card = ModelCard(
        backbone=backbone, modality=manifest.modality, labels=manifest.task.labels,
        max_length=manifest.task.max_length if manifest.modality == "text" else 0,
        image_size=manifest.task.image_size if manifest.modality == "image" else 0, source="federation",
        run_id=run_id, rounds=last, method=config.method, bundle_sha=bundle.sha256,
        training_samples=sum(r.n_train for r in rows) or None,
        metrics={"personal_accuracy": mean([r.personal_accuracy for r in rows]),
                 "global_accuracy": mean([r.global_accuracy for r in rows]), "devices": len(rows),
                 "note": f"means over the {backbone} group's devices in round {last}, each measured with its own "
                         "copy before upload"},
        exported_unix=time.time())
    return export_tensors(bundle.directory, manifest, tensors, card, out, int8=int8, threads=threads)
