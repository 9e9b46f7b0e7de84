"""A frozen backbone with DeMA adapters at position-aligned slots and a classification head.

Adapters are attached with forward hooks, so the backbone's own parameter names stay untouched (they are
the frozen initializer names in the exported graph) and the trainable names read `adapters.{s}.{family}...`
and `head.*` on every backbone.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from export.catalog import BackboneSpec
from export.dema.config import DemaConfig, family_of, resolve_scopes, slot_blocks
from export.dema.layer import DemaAdapter


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
        blocks = spec.blocks(self.backbone)
        for block_index in sorted(set(self.slot_blocks)):
            slots = [s for s, b in enumerate(self.slot_blocks) if b == block_index]
            blocks[block_index].register_forward_hook(self._make_hook(slots))
        self.reset_trainable()

    def _make_hook(self, slots: list[int]) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            for s in slots:
                hidden = self.adapters[s](hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """(input_ids, attention_mask) for a text backbone, (pixel_values,) for an image backbone."""
        if self.spec.modality == "image":
            (pixel_values,) = inputs
            hidden: torch.Tensor = self.backbone(pixel_values)
            return self.head(hidden.mean(dim=1))
        input_ids, attention_mask = inputs
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)

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
