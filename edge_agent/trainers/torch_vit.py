"""The exported image classifier rebuilt as plain PyTorch: DINOv2 ViT blocks, DeMA adapters, mean pool, head.

Mirrors export/vision.py (fixed-size position embeddings, first k blocks, final LayerNorm) and transformers'
eager `Dinov2Layer` (pre-norm attention and MLP, each scaled by its LayerScale), operation for operation, so an
update computed here equals ORT's to float rounding. No transformers on the device; torch is reached through
`load_torch()` only (see torch_model.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.trainers.torch_model import (
    ExpertCounts,
    Tensor,
    load_torch,
    read_shape_config,
    run_adapters,
    slots_after_blocks,
)

VIT_FORMAT = "heterotune-dinov2-v1"


@dataclass(frozen=True)
class VitShape:
    """What the frozen ViT looks like; read from the torch part's safetensors metadata."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    patch_size: int
    image_size: int
    num_channels: int

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: Path) -> VitShape:
        shape = cls(**read_shape_config(metadata, source, VIT_FORMAT))
        if shape.image_size % shape.patch_size:
            raise ValueError(f"{source}: image size {shape.image_size} is not a multiple of the patch size "
                             f"{shape.patch_size}")
        return shape

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def expected_weights(self) -> dict[str, tuple[int, ...]]:
        """Every parameter name of export.vision.FixedSizeDinov2, with its shape."""
        d, f, p = self.hidden_size, self.intermediate_size, self.patch_size
        out: dict[str, tuple[int, ...]] = {
            "embeddings.cls_token": (1, 1, d),
            "embeddings.position_embeddings": (1, self.tokens, d),
            "embeddings.patch_embeddings.projection.weight": (d, self.num_channels, p, p),
            "embeddings.patch_embeddings.projection.bias": (d,),
            "layernorm.weight": (d,),
            "layernorm.bias": (d,),
        }
        for i in range(self.num_hidden_layers):
            q = f"encoder.layer.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{q}attention.{proj}.weight"], out[f"{q}attention.{proj}.bias"] = (d, d), (d,)
            for norm in ("norm1", "norm2"):
                out[f"{q}{norm}.weight"], out[f"{q}{norm}.bias"] = (d,), (d,)
            out[f"{q}layer_scale1.lambda1"], out[f"{q}layer_scale2.lambda1"] = (d,), (d,)
            out[f"{q}mlp.fc1.weight"], out[f"{q}mlp.fc1.bias"] = (f, d), (f,)
            out[f"{q}mlp.fc2.weight"], out[f"{q}mlp.fc2.bias"] = (d, f), (d,)
        return out


class AdapterVitClassifier:
    """Frozen ViT -> DeMA adapters after the manifest's slot blocks -> final LayerNorm -> token mean -> head."""

    def __init__(self, shape: VitShape, weights: Mapping[str, Tensor], slot_blocks: Sequence[int],
                 experts: ExpertCounts) -> None:
        self.slots_after = slots_after_blocks(slot_blocks, shape.num_hidden_layers)
        self.last_slot = len(slot_blocks) - 1
        self.torch: Any = load_torch()
        self.shape = shape
        self.weights = dict(weights)
        self.experts = experts
        self.head_dim = shape.hidden_size // shape.num_attention_heads
        self.scaling = self.head_dim**-0.5

    def classify(self, params: Mapping[str, Tensor], pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the representation (the last adapter's z, token mean), as the export's classify."""
        functional = self.torch.nn.functional
        w, shape = self.weights, self.shape
        if tuple(pixel_values.shape[1:]) != (shape.num_channels, shape.image_size, shape.image_size):
            raise ValueError(f"pixel batch {tuple(pixel_values.shape)} does not match the backbone's "
                             f"{shape.num_channels}x{shape.image_size}x{shape.image_size} input")
        patches = functional.conv2d(pixel_values, w["embeddings.patch_embeddings.projection.weight"],
                                    w["embeddings.patch_embeddings.projection.bias"], stride=shape.patch_size)
        patches = patches.flatten(2).transpose(1, 2)
        cls = w["embeddings.cls_token"].expand(patches.shape[0], -1, -1)
        hidden = self.torch.cat((cls, patches), dim=1) + w["embeddings.position_embeddings"]
        last: list[Tensor] = []
        for block in range(shape.num_hidden_layers):
            hidden = self._block(block, hidden)
            hidden = run_adapters(self.torch, self.slots_after.get(block, ()), params, hidden, self.experts,
                                  self.last_slot, last)
        hidden = functional.layer_norm(hidden, (shape.hidden_size,), w["layernorm.weight"], w["layernorm.bias"],
                                       shape.layer_norm_eps)
        logits = functional.linear(hidden.mean(dim=1), params["head.weight"], params["head.bias"])
        return logits, last[-1].mean(dim=1)

    def _block(self, index: int, hidden: Tensor) -> Tensor:
        torch = self.torch
        functional = torch.nn.functional
        w, shape = self.weights, self.shape
        p = f"encoder.layer.{index}."
        batch, tokens, d = hidden.shape
        heads = shape.num_attention_heads

        normed = functional.layer_norm(hidden, (d,), w[f"{p}norm1.weight"], w[f"{p}norm1.bias"], shape.layer_norm_eps)

        def project(name: str) -> Tensor:
            out = functional.linear(normed, w[f"{p}attention.{name}.weight"], w[f"{p}attention.{name}.bias"])
            return out.view(batch, tokens, heads, self.head_dim).transpose(1, 2)

        query, key, value = project("q_proj"), project("k_proj"), project("v_proj")
        scores = torch.matmul(query, key.transpose(2, 3)) * self.scaling
        context = torch.matmul(torch.softmax(scores, dim=-1), value).transpose(1, 2).reshape(batch, tokens, d)
        attended = functional.linear(context, w[f"{p}attention.o_proj.weight"], w[f"{p}attention.o_proj.bias"])
        hidden = attended * w[f"{p}layer_scale1.lambda1"] + hidden
        normed = functional.layer_norm(hidden, (d,), w[f"{p}norm2.weight"], w[f"{p}norm2.bias"], shape.layer_norm_eps)
        inner = functional.gelu(functional.linear(normed, w[f"{p}mlp.fc1.weight"], w[f"{p}mlp.fc1.bias"]))
        mlp = functional.linear(inner, w[f"{p}mlp.fc2.weight"], w[f"{p}mlp.fc2.bias"])
        return mlp * w[f"{p}layer_scale2.lambda1"] + hidden
