"""The bundle manifest: what a device needs to know about the graphs it was sent.

Lives in `protocols` because both sides read it: the builder writes it at export, the agent validates it
after fetching a bundle, the coordinator uses its tensor list to check updates.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocols.topics import SHA256_PATTERN

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = 1
TORCH_PART = "torch-backbone"
# The backend ``cost_card`` was measured with: the card every coordinator has read since before there were two.
DEFAULT_COST_BACKEND = "ort"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorEntry(_Frozen):
    name: str
    shape: tuple[int, ...]
    dtype: str
    family: str
    scope: str


class TaskEntry(_Frozen):
    name: str
    labels: tuple[str, ...] = Field(min_length=2)
    max_length: int = Field(ge=8)  # text: tokens per example after truncation
    batch_size: int = Field(ge=1)
    image_size: int = Field(0, ge=0)  # image: the square input size the graphs take (0 for text)


class CostCardEntry(_Frozen):
    """Measured on the builder at export (step time and RSS at the bundle's batch and sequence length)."""

    peak_train_rss_mb: float
    step_seconds: float
    eval_seconds_per_sample: float
    flops_per_step: float
    payload_bytes: int
    bundle_bytes: int
    builder_gflops: float
    # Which measurement made the card (edge_agent.probe.PROBE_VERSION; 0: a card from before the field existed).
    probe_version: int = Field(default=0, ge=0)


class PartEntry(_Frozen):
    """A content-addressed blob that travels beside the bundle tar, fetched only by the backends named.

    Why a separate blob: the PyTorch backend needs the frozen backbone in a form torch reads without ORT,
    which would double an ORT-only device's download if it were in the tar. The tar's manifest carries the
    part's address (hash, size, chunk count), so a device that needs it can ask for it and verify it.
    """

    file: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # its name in the bundle directory
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)
    chunks: int = Field(ge=1)
    backends: tuple[str, ...] = Field(min_length=1)
    description: str = ""


class BundleManifest(_Frozen):
    format: int = BUNDLE_FORMAT
    backbone: str
    hidden: int
    layers: int
    slot_blocks: tuple[int, ...]
    dema: dict[str, int]
    task: TaskEntry
    modality: Literal["text", "image"] = "text"
    tokenizer: str = "tokenizer.json"  # text bundles only ("" for images, which the agent preprocesses in numpy)
    initial_tensors: str = "initial.safetensors"
    tensors: tuple[TensorEntry, ...]
    backbone_params: int
    files: dict[str, str]  # file name -> sha256
    cost_card: CostCardEntry | None = None  # measured with the ORT trainer (DEFAULT_COST_BACKEND)
    # Cards measured with other trainer backends (backend name -> card). Separate from ``cost_card`` so manifests
    # and coordinators from before it keep reading the ORT card where they always did.
    cost_card_by_backend: dict[str, CostCardEntry] = Field(default_factory=dict)
    parts: dict[str, PartEntry] = Field(default_factory=dict)  # part name -> blob beside the tar

    def cost_card_for(self, backend: str) -> CostCardEntry | None:
        """The card measured with ``backend``, else the ORT card (None if the bundle was built without costs).

        Falling back keeps bundles measured before per-backend cards assignable; the coordinator says which
        backend's card it used (`coordinator.assignment.cost_card_of`).
        """
        if backend != DEFAULT_COST_BACKEND and backend in self.cost_card_by_backend:
            return self.cost_card_by_backend[backend]
        return self.cost_card

    def cost_card_backend(self, backend: str) -> str:
        """The backend whose card ``cost_card_for(backend)`` returns."""
        return backend if backend in self.cost_card_by_backend else DEFAULT_COST_BACKEND

    def parts_for(self, backend: str) -> dict[str, PartEntry]:
        """The parts a trainer backend needs on top of the tar (none for ORT)."""
        return {name: part for name, part in self.parts.items() if backend in part.backends}

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"bundle for {self.backbone} has no tensor '{name}'")

    def names_in_scopes(self, scopes: dict[str, str], wanted: tuple[str, ...]) -> list[str]:
        """Trainable names whose family has one of the wanted scopes under a run's scope map."""
        return [t.name for t in self.tensors if scopes.get(t.family, t.scope) in wanted]
