"""Content-addressed bundles: everything one backbone needs to train on a device, in one tar.

A bundle is keyed twice. The *recipe key* (backbone, DeMA config, task, toolchain versions) decides whether
an export can be skipped; the *content sha256* of the tar is what travels over MQTT and what devices cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.assets import heterotune_home
from export.catalog import PATCH_SIZE, BackboneSpec, get_backbone
from export.dema import AdapterClassifier, DemaConfig
from export.locks import exclusive
from protocols.bundle_manifest import (
    MANIFEST_NAME,
    TORCH_PART,
    BundleManifest,
    CostCardEntry,
    PartEntry,
    TaskEntry,
    TensorEntry,
)
from protocols.chunks import BlobRef

RECIPE_VERSION = 7  # 2: the torch-backbone part beside the tar; 3: image backbones; 4: a torch cost card too;
# 5: the graphs compute their own loss and take FedProto's prototype inputs (labels, prototypes, prototype_weights)
# 6: and the public-set anchors (anchors, anchor_weights); label -100 marks an unlabelled sample
# 7: the ORT training artefacts (checkpoint, training and optimizer graphs) are parts for ORT, not in the tar
ARCHIVE_NAME = "bundle.tar"
# What only the ORT trainer reads: parts beside the tar (backends ["ort"]), so a torch device never downloads them.
# The tar keeps what every backend needs: manifest, tokenizer, initial tensors and the eval graph (which
# `edge-agent export` turns into the inference model on both backends).
ORT_PARTS = {"ort-checkpoint": "checkpoint", "ort-training-graph": "training_model.onnx",
             "ort-optimizer-graph": "optimizer_model.onnx"}
TORCH_BACKBONE_FILE = "backbone.safetensors"
# Architectures the PyTorch trainer backend re-implements (edge_agent/trainers/torch_model.py, torch_vit.py), and
# the torch part's format for each. A bundle of any other architecture (MPNet) gets no torch part and no torch card:
# only ORT devices can train it, and the coordinator never assigns it to a torch device.
TORCH_BACKBONE_FORMATS = {"bert": "heterotune-bert-v1", "dinov2": "heterotune-dinov2-v1"}
BYTES_PER_FLOAT = 4


@dataclass(frozen=True)
class TaskSpec:
    """A classification task as the exported graphs see it."""

    name: str
    labels: tuple[str, ...]
    max_length: int = 64
    batch_size: int = 16


@dataclass(frozen=True)
class BundleRecipe:
    backbone: str
    task: TaskSpec
    dema: DemaConfig = field(default_factory=DemaConfig)
    # Families a run shares although they are local by default (e.g. ("head", "group")). The manifest's scopes are
    # what a device goes by when it decides what it may send (edge_agent/upload_guard.py), so a run that shares its
    # head needs bundles that say so; every other method and scope choice uses the same default bundles.
    shared_local_families: tuple[tuple[str, str], ...] = ()

    def key(self) -> str:
        """Changes whenever anything that shapes the exported bytes changes."""
        import onnx
        import torch
        import transformers

        payload = {
            "recipe": RECIPE_VERSION,
            "backbone": self.backbone,
            "task": asdict(self.task),
            "dema": self.dema.to_dict(),
            **({"shared_local_families": [list(pair) for pair in self.shared_local_families]}
               if self.shared_local_families else {}),
            "versions": [torch.__version__, transformers.__version__, onnx.__version__],
            "code": code_digest(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


CODE_PACKAGES = ("export", "edge_agent")  # the packages whose source keys a bundle (see code_digest)


def code_digest(root: Path = Path(__file__).parent.parent) -> str:
    """The exporter's own source, and all of the agent code the cost-card probes run, are part of the recipe: a
    change to either must not reuse stale bundles or cards.

    Why the whole agent and not only ``probe.py``: a card is the peak RSS of the agent's own round code
    (trainers, learner, page-cache warm-up), so any of it can move the number. With a digest of the probe alone,
    a bundle kept in ~/.cache (which CI, run on the session's machine, also reads) keeps a card measured by older
    agent code.
    """
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A built bundle on the builder's disk."""

    directory: Path
    manifest: BundleManifest
    sha256: str
    size: int

    @property
    def archive(self) -> Path:
        return self.directory / ARCHIVE_NAME

    def archive_bytes(self) -> bytes:
        return self.archive.read_bytes()

    def download_bytes(self, backend: str = "ort") -> int:
        """What a device on ``backend`` downloads to join: the tar plus the parts that backend needs."""
        return self.size + sum(part.size for part in self.manifest.parts_for(backend).values())

    def part_path(self, name: str) -> Path:
        """Where a part (e.g. the torch backbone) lives on the builder's disk, beside the tar."""
        return self.directory / self.manifest.parts[name].file

    def part_bytes(self, name: str) -> bytes:
        return self.part_path(name).read_bytes()

    def initial_tensors(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.directory / self.manifest.initial_tensors))


def bundle_root() -> Path:
    return heterotune_home() / "bundles"


def load_bundle(directory: Path) -> Bundle:
    manifest = BundleManifest.model_validate_json((directory / MANIFEST_NAME).read_text())
    data = (directory / ARCHIVE_NAME).read_bytes()
    return Bundle(directory, manifest, hashlib.sha256(data).hexdigest(), len(data))


def build_bundle(recipe: BundleRecipe, *, root: Path | None = None, measure_cost: bool = True,
                 log: bool = True) -> Bundle:
    """Export (or reuse) the bundle for a recipe. Re-export is skipped when the recipe key exists."""
    final = (root or bundle_root()) / f"{recipe.backbone}-{recipe.key()}"
    if (final / ARCHIVE_NAME).exists():
        return load_bundle(final)
    with exclusive(final.with_name(final.name + ".lock")):
        if (final / ARCHIVE_NAME).exists():  # another process built it while this one waited
            return load_bundle(final)
        spec = get_backbone(recipe.backbone)
        if log:
            print(f"[export] building bundle for {spec.name} ({spec.description})", file=sys.stderr, flush=True)
        work = final.with_name(final.name + ".building")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _export_into(work, spec, recipe, measure_cost=measure_cost)
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
    return load_bundle(final)


def _export_into(work: Path, spec: BackboneSpec, recipe: BundleRecipe, *, measure_cost: bool) -> None:
    from safetensors.numpy import save_file

    from export.onnx_export import ARTIFACT_FILES, export_onnx, generate_training_artifacts

    task = recipe.task
    model = AdapterClassifier(spec, recipe.dema, len(task.labels))
    proto = export_onnx(model, work / "model.onnx", batch_size=2, seq_len=16)
    generate_training_artifacts(model, proto, work)
    (work / "model.onnx").unlink()
    save_file({k: v.numpy() for k, v in model.trainable_state().items()}, str(work / "initial.safetensors"))
    tokenizer = ""
    if spec.modality == "text":
        tokenizer = "tokenizer.json"
        shutil.copy(spec.tokenizer_json(), work / tokenizer)
    specs = model.tensor_specs(dict(recipe.shared_local_families))
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    # A torch part only where the PyTorch backend can run the encoder; without one, a torch device is not offered it.
    parts: dict[str, PartEntry] = {name: _ort_part(work / file) for name, file in ORT_PARTS.items()}
    if spec.architecture in TORCH_BACKBONE_FORMATS:
        parts[TORCH_PART] = _write_torch_backbone(model, work / TORCH_BACKBONE_FILE)
    in_parts = set(ORT_PARTS.values())
    files = sorted(name for name in (*ARTIFACT_FILES, tokenizer, "initial.safetensors")
                   if name and name not in in_parts)
    manifest = BundleManifest(
        backbone=spec.name, hidden=spec.hidden, layers=spec.layers, slot_blocks=tuple(model.slot_blocks),
        dema=recipe.dema.to_dict(), modality="image" if spec.modality == "image" else "text", tokenizer=tokenizer,
        task=TaskEntry(name=task.name, labels=task.labels, max_length=task.max_length,
                       batch_size=task.batch_size, image_size=spec.image_size),
        tensors=tuple(TensorEntry(**s.to_dict()) for s in specs),
        backbone_params=backbone_params,
        files={name: hashlib.sha256((work / name).read_bytes()).hexdigest() for name in files},
        parts=parts,
    )
    (work / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))  # the probe reads it
    if measure_cost:
        # The probes run on the work dir as it is now: the torch part is already beside the graphs (written
        # above), which the torch probe's trainer loads just as a device does after fetching it. A bundle no torch
        # device can train gets no torch card (a card would claim a cost nobody can incur).
        ort_card = _cost_card(work, manifest, backend="ort")
        by_backend = {backend: _cost_card(work, manifest, backend=backend)
                      for backend in sorted({b for part in parts.values() for b in part.backends} - {"ort"})}
        manifest = manifest.model_copy(update={"cost_card": ort_card, "cost_card_by_backend": by_backend})
        (work / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
    (work / ARCHIVE_NAME).write_bytes(_deterministic_tar(work, [*files, MANIFEST_NAME]))


def _ort_part(path: Path) -> PartEntry:
    """One ORT training artefact as a part only ORT devices fetch (see ``ORT_PARTS``)."""
    ref = BlobRef.from_blob(path.read_bytes())
    return PartEntry(file=path.name, sha256=ref.sha256, size=ref.size, chunks=ref.chunks, backends=("ort",),
                     description=f"ONNX Runtime Training artefact {path.name}, read by the ORT trainer only")


def _write_torch_backbone(model: AdapterClassifier, path: Path) -> PartEntry:
    """The frozen encoder as safetensors with Hugging Face parameter names, for the PyTorch backend.

    The ORT checkpoint is a flatbuffer only ORT reads, so a device without an onnxruntime-training wheel (Linux
    aarch64) needs the same weights in a plain format. The encoder's shape (heads, FFN width, LayerNorm eps,
    activation, and for images patch and input size) goes in the safetensors metadata, so the file alone says how
    to run it.
    """
    from safetensors.torch import save_file

    fmt = TORCH_BACKBONE_FORMATS.get(model.spec.architecture)
    if fmt is None:
        raise ValueError(f"the PyTorch backend cannot run {model.spec.name} ({model.spec.architecture}); "
                         f"torch parts exist for {', '.join(TORCH_BACKBONE_FORMATS)} only")
    if model.spec.architecture == "dinov2":
        shape = model.backbone.torch_part_config()  # type: ignore[operator]  # export.vision.FixedSizeDinov2
    else:
        config: Any = getattr(model.backbone, "config")  # noqa: B009 - a transformers BertConfig, untyped here
        shape = {
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size, "hidden_act": config.hidden_act,
            "layer_norm_eps": config.layer_norm_eps, "max_position_embeddings": config.max_position_embeddings,
            "type_vocab_size": config.type_vocab_size,
        }
    weights = {name: p.detach().contiguous() for name, p in model.backbone.named_parameters()}
    save_file(weights, str(path), metadata={"format": fmt, "config": json.dumps(shape)})
    data = path.read_bytes()
    ref = BlobRef.from_blob(data)
    return PartEntry(file=path.name, sha256=ref.sha256, size=ref.size, chunks=ref.chunks, backends=("torch",),
                     description="frozen encoder weights (Hugging Face names) for the PyTorch trainer backend")


def _cost_card(work: Path, manifest: BundleManifest, *, backend: str) -> CostCardEntry:
    """Run the device-side probe with ``backend``'s trainer in its own process, so the RSS it reports is
    training's alone (and one backend's libraries never inflate the other's card).

    ``bundle_bytes`` is what a device on that backend downloads: the tar's files, plus the parts only that backend
    fetches (the torch backbone for torch). The upload payload is the same for every backend.
    """
    task = manifest.task
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent.probe", str(work), "--batch-size", str(task.batch_size),
         "--seq-len", str(task.max_length), "--num-classes", str(len(task.labels)), "--threads", "1",
         "--backend", backend],
        capture_output=True, text=True, check=False, env=single_thread_env(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} cost probe failed for {manifest.backbone}: {proc.stderr.strip()[-800:]}")
    measured = json.loads(proc.stdout)
    if measured.get("backend") != backend:
        raise RuntimeError(f"cost probe for {manifest.backbone} measured backend {measured.get('backend')!r}, "
                           f"not {backend!r}")
    shared = [t for t in manifest.tensors if t.scope in ("global", "group")]
    payload = sum(int(np.prod(t.shape)) for t in shared) * BYTES_PER_FLOAT
    size = sum((work / name).stat().st_size for name in manifest.files)
    size += sum(part.size for part in manifest.parts_for(backend).values())
    return CostCardEntry(
        peak_train_rss_mb=measured["peak_train_rss_mb"],
        step_seconds=measured["step_seconds"],
        eval_seconds_per_sample=measured["eval_seconds_per_sample"],
        flops_per_step=training_flops(manifest),
        payload_bytes=payload,
        bundle_bytes=size,
        builder_gflops=measured["gflops"],
        probe_version=int(measured["probe_version"]),
    )


def single_thread_env() -> dict[str, str]:
    """One BLAS/OpenMP thread: the cost probe and each emulated device measure the same way. Four agents on
    two cores with two spinning BLAS threads each starve one another (a matmul benchmark read 1.3 instead of
    ~100 GFLOP/s that way)."""
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def training_flops(manifest: BundleManifest) -> float:
    """Analytic FLOPs of one training step at the bundle's batch and sequence length (an estimate).

    Per token and block, a BERT encoder costs about 24·d² (projections + FFN) + 4·T·d (attention) FLOPs
    forward. Backward runs only from the first adapter slot up (nothing below it needs gradients) and,
    with the backbone frozen, computes activation gradients only: about one more forward's worth.
    Adapters are small and counted at 3x their forward.
    """
    d, layers, t = manifest.hidden, manifest.layers, tokens_per_example(manifest)
    tokens = manifest.task.batch_size * t
    per_block = 24 * d * d + 4 * t * d
    backward_blocks = layers - min(manifest.slot_blocks)
    adapter_params = sum(int(np.prod(x.shape)) for x in manifest.tensors if x.family != "head")
    return float(tokens * (per_block * (layers + backward_blocks) + 3 * 2 * adapter_params))


def tokens_per_example(manifest: BundleManifest) -> int:
    """Sequence length the encoder sees: the text budget, or an image's patches plus CLS."""
    if manifest.modality == "image":
        return (manifest.task.image_size // PATCH_SIZE) ** 2 + 1
    return manifest.task.max_length


def _deterministic_tar(directory: Path, names: list[str]) -> bytes:
    """Same files, same bytes: sorted members, zeroed times and owners."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(names):
            data = (directory / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
