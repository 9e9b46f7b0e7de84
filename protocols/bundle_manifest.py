"""The bundle manifest: what a device needs to know about the graphs it was sent.

Lives in `protocols` because both sides read it: the builder writes it at export, the agent validates it
after fetching a bundle, the coordinator uses its tensor list to check updates.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = 1


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
    max_length: int = Field(ge=8)
    batch_size: int = Field(ge=1)


class CostCardEntry(_Frozen):
    """Measured on the builder at export (step time and RSS at the bundle's batch and sequence length)."""

    peak_train_rss_mb: float
    step_seconds: float
    eval_seconds_per_sample: float
    flops_per_step: float
    payload_bytes: int
    bundle_bytes: int
    builder_gflops: float


class BundleManifest(_Frozen):
    format: int = BUNDLE_FORMAT
    backbone: str
    hidden: int
    layers: int
    slot_blocks: tuple[int, ...]
    dema: dict[str, int]
    task: TaskEntry
    modality: str = "text"
    tokenizer: str = "tokenizer.json"
    initial_tensors: str = "initial.safetensors"
    tensors: tuple[TensorEntry, ...]
    backbone_params: int
    files: dict[str, str]  # file name -> sha256
    cost_card: CostCardEntry | None = None

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"bundle for {self.backbone} has no tensor '{name}'")

    def names_in_scopes(self, scopes: dict[str, str], wanted: tuple[str, ...]) -> list[str]:
        """Trainable names whose family has one of the wanted scopes under a run's scope map."""
        return [t.name for t in self.tensors if scopes.get(t.family, t.scope) in wanted]
