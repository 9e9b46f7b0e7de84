"""A DINOv2 ViT cut to one input size and a chosen depth, so the exported graph holds no resampling.

Why not export `Dinov2Model` as is: it re-interpolates its 37x37 position grid on every call while tracing (bicubic
`Resize` in the graph), which costs every step on the device and which the PyTorch backend would have to match
bit for bit. The grid is resized once here instead, with transformers' own interpolation, and stored as a frozen
parameter. Depth truncation gives the catalog several backbones of one family (the first k blocks of the same
pretrained network), the vision counterpart of MiniLM-L3/L6.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FixedSizeDinov2(nn.Module):
    """Patch embedding + CLS + fixed position embeddings -> the first `depth` blocks -> final LayerNorm.

    Parameter names follow transformers' `Dinov2Model` (embeddings.*, encoder.layer.N.*, layernorm.*), so the
    frozen initializer names in the graphs and in the torch part read like the checkpoint they came from.
    """

    def __init__(self, model: nn.Module, depth: int, image_size: int) -> None:
        super().__init__()
        config: Any = getattr(model, "config")  # noqa: B009 - a transformers Dinov2Config, untyped here
        layers = model.get_submodule("encoder.layer")
        assert isinstance(layers, nn.ModuleList)
        if not 1 <= depth <= len(layers):
            raise ValueError(f"depth {depth} is outside 1..{len(layers)} blocks of this DINOv2")
        if image_size % config.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {config.patch_size}")
        self.config = config
        self.depth = depth
        self.image_size = image_size
        source: Any = model.get_submodule("embeddings")
        grid = image_size // config.patch_size
        with torch.no_grad():  # not tracing: transformers resizes (or, at the native grid, returns) the table
            dummy = torch.zeros(1, grid * grid + 1, config.hidden_size)
            positions = source.interpolate_pos_encoding(dummy, image_size, image_size).detach().clone()
        self.embeddings = nn.Module()
        self.embeddings.patch_embeddings = source.patch_embeddings
        self.embeddings.cls_token = source.cls_token
        self.embeddings.position_embeddings = nn.Parameter(positions, requires_grad=False)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(list(layers)[:depth])
        self.layernorm = model.get_submodule("layernorm")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings: Any = self.embeddings
        patches = embeddings.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
        cls = embeddings.cls_token.expand(patches.shape[0], -1, -1)
        hidden = torch.cat((cls, patches), dim=1) + embeddings.position_embeddings
        for layer in self.encoder.layer:  # type: ignore[union-attr]
            hidden = layer(hidden)
        out: torch.Tensor = self.layernorm(hidden)
        return out

    def torch_part_config(self) -> dict[str, Any]:
        """What the PyTorch backend needs to rebuild this encoder from its weights alone."""
        c = self.config
        return {"hidden_size": c.hidden_size, "num_hidden_layers": self.depth,
                "num_attention_heads": c.num_attention_heads, "intermediate_size": int(c.hidden_size * c.mlp_ratio),
                "hidden_act": c.hidden_act, "layer_norm_eps": c.layer_norm_eps, "patch_size": c.patch_size,
                "image_size": self.image_size, "num_channels": c.num_channels}
