"""A frozen backbone with DeMA adapters at position-aligned slots and a classification head.

Adapters are attached with forward hooks, so the backbone's own parameter names stay untouched (they are
the frozen initializer names in the exported graph) and the trainable names read `adapters.{s}.{family}...`
and `head.*` on every backbone.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from export.catalog import BackboneSpec
from export.dema.config import DemaConfig, family_of, resolve_scopes, slot_blocks
from export.dema.layer import DemaAdapter
from protocols.anchors import NO_LABEL


@dataclass(frozen=True)
class TensorSpec:
    """One trainable tensor as the manifest lists it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    family: str
    scope: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "family": self.family, "scope": self.scope}


def training_loss(logits: torch.Tensor, representation: torch.Tensor, labels: torch.Tensor,
                  prototypes: torch.Tensor, prototype_weights: torch.Tensor, anchors: torch.Tensor,
                  anchor_weights: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, FedProto's pull towards the global class prototypes, and the public-set anchors' pull:

        loss = CE(logits, y) + mean_i  w[y_i] · mean_r (representation_i - prototypes[y_i])²
                             + mean_i  a_i · mean_r (representation_i - anchors_i)²

    ``prototypes`` is [classes, r], ``prototype_weights`` [classes]: lambda where the class has a global
    prototype, 0 elsewhere. ``anchors`` is [B, r], ``anchor_weights`` [B]: a public sample's fleet-mean
    representation and its weight (edge_agent/anchors.py). A sample labelled ``NO_LABEL`` (-100, cross-entropy's
    ignore index) adds no cross-entropy and no prototype pull: a batch of public samples trains only through its
    anchors (its CE is 0, not the NaN of a mean over nothing). A method without either pull feeds zero weights,
    so its loss, gradients and updates are plain cross-entropy's (both terms are exactly 0.0 and so are their
    gradients).
    """
    labelled = labels >= 0
    # The mean over labelled samples, 0 (not NaN) for a batch of public samples only.
    cross_entropy = (nn.functional.cross_entropy(logits, labels, ignore_index=NO_LABEL, reduction="sum")
                     / labelled.sum().clamp(min=1).to(logits.dtype))
    known = torch.where(labelled, labels, torch.zeros_like(labels))
    distance = (representation - prototypes[known]).pow(2).mean(dim=-1)
    pull = (prototype_weights[known] * labelled.to(distance.dtype) * distance).mean()
    anchored = (anchor_weights * (representation - anchors).pow(2).mean(dim=-1)).mean()
    return cross_entropy + pull + anchored


class TrainingObjective(nn.Module):
    """The module the training graph is traced from: the classifier's own submodules (so every parameter keeps
    its name) and `AdapterClassifier.objective` as forward."""

    def __init__(self, classifier: AdapterClassifier) -> None:
        super().__init__()
        self.backbone, self.adapters, self.head = classifier.backbone, classifier.adapters, classifier.head
        self._objective = classifier.objective

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._objective(*args)


class AdapterClassifier(nn.Module):
    """Backbone (frozen) -> DeMA after blocks round(s*L/S) -> mean pool -> linear head.

    Text pools over the attended tokens (masked mean); images over every token, CLS included, of the backbone's
    final LayerNorm output.
    """

    def __init__(self, spec: BackboneSpec, config: DemaConfig, num_classes: int,
                 backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.config = config
        self.backbone = backbone if backbone is not None else spec.load()
        self.adapters = nn.ModuleList(DemaAdapter(spec.hidden, config) for _ in range(config.slots))
        self.head = nn.Linear(spec.hidden, num_classes)
        self.slot_blocks = slot_blocks(spec.layers, config.slots)
        self._last_z = torch.zeros(0)  # set by the last slot's hook during every forward
        blocks = spec.blocks(self.backbone)
        for block_index in sorted(set(self.slot_blocks)):
            slots = [s for s, b in enumerate(self.slot_blocks) if b == block_index]
            blocks[block_index].register_forward_hook(self._make_hook(slots))
        self.reset_trainable()

    def _make_hook(self, slots: list[int]) -> Any:
        last = self.config.slots - 1

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            for s in slots:
                adapter = cast(DemaAdapter, self.adapters[s])
                z = adapter.project(hidden)
                if s == last:
                    self._last_z = z  # the representation's tokens, read by classify() in the same forward
                hidden = adapter.mix(hidden, z)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """(input_ids, attention_mask) for a text backbone, (pixel_values,) for an image backbone."""
        return self.classify(*inputs)[0]

    def classify(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the representation: the last adapter's r-space tokens, pooled like the head's input."""
        if self.spec.modality == "image":
            (pixel_values,) = inputs
            hidden: torch.Tensor = self.backbone(pixel_values)
            return self.head(hidden.mean(dim=1)), self._last_z.mean(dim=1)
        input_ids, attention_mask = inputs
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        count = mask.sum(dim=1).clamp(min=1.0)
        pooled = (hidden * mask).sum(dim=1) / count
        return self.head(pooled), (self._last_z * mask).sum(dim=1) / count

    def objective(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the training graph computes: (loss, logits, representation) from (*inputs, labels, prototypes,
        prototype_weights, anchors, anchor_weights); see `training_loss`."""
        *inputs, labels, prototypes, prototype_weights, anchors, anchor_weights = args
        logits, representation = self.classify(*inputs)
        loss = training_loss(logits, representation, labels, prototypes, prototype_weights, anchors, anchor_weights)
        return loss, logits, representation

    # --- trainable tensors -------------------------------------------------------------------------

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def frozen_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if not p.requires_grad]

    def tensor_specs(self, scope_overrides: Mapping[str, str] | None = None) -> list[TensorSpec]:
        scopes = resolve_scopes(scope_overrides)
        return [
            TensorSpec(n, tuple(p.shape), "float32", family_of(n), scopes[family_of(n)])
            for n, p in self.named_parameters()
            if p.requires_grad
        ]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def reset_trainable(self) -> None:
        """Seeded initial values, identical for a tensor wherever its scope says it is shared.

        Global tensors are seeded by name only, so every backbone starts with the same values; group and
        local tensors are seeded by (backbone, name). W_out starts at zero: the model's output is exactly
        the frozen backbone's until training moves it.
        """
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            family = family_of(name)
            key = name if resolve_scopes()[family] == "global" else f"{self.spec.name}/{name}"
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.config.seed}:{key}".encode()))
            if family == "w_out":
                param.zero_()
            elif family == "ln":
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                fan_in = param.shape[-1] if param.dim() > 1 else self._fan_in_of_bias(name)
                bound = 1.0 / fan_in**0.5
                param.copy_(torch.rand(param.shape, generator=gen) * 2 * bound - bound)

    def _fan_in_of_bias(self, bias_name: str) -> int:
        weight = dict(self.named_parameters())[bias_name.rsplit(".", 1)[0] + ".weight"]
        return int(weight.shape[-1])
