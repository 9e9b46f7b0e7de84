"""The exported classifier rebuilt as plain PyTorch functions: BERT encoder, DeMA adapters, pooling, head.

Why not transformers: a device installs only torch (PyPI has CPU wheels for x86_64 and aarch64), and the
computation is small enough to write out. It mirrors, operation for operation, what export/ traces into the
ONNX graphs (transformers' eager BERT path, export/dema/layer.py, export/dema/model.py), so an update computed
here equals ORT's to float rounding.

torch is reached through `load_torch()` at run time only: this module is imported solely by the torch backend,
and the agent's import guard (tests/test_agent_imports.py) forbids torch import statements in edge_agent.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

Tensor = Any  # torch.Tensor: not importable for annotations here, see the module docstring

WEIGHTS_FORMAT = "heterotune-bert-v1"
ADAPTER_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which the DeMA adapter's LayerNorm uses
_EXPERT_NAME = re.compile(r"^adapters\.(\d+)\.(experts|private)\.(\d+)\.a\.weight$")


def load_torch() -> Any:
    """The torch module, or ImportError with the install command."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise ImportError("the torch trainer backend needs PyTorch: pip install torch (PyPI has CPU wheels for "
                          "Linux x86_64 and aarch64; on aarch64 torch==2.9.1 is known to work)") from exc


@dataclass(frozen=True)
class EncoderShape:
    """What the frozen encoder looks like; read from the torch part's safetensors metadata."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: Path) -> EncoderShape:
        return cls(**read_shape_config(metadata, source, WEIGHTS_FORMAT))

    def expected_weights(self) -> dict[str, tuple[int, ...]]:
        """Every Hugging Face parameter name of a BertModel without pooler, with its shape."""
        d, f = self.hidden_size, self.intermediate_size
        out: dict[str, tuple[int, ...]] = {
            "embeddings.word_embeddings.weight": (self.vocab_size, d),
            "embeddings.position_embeddings.weight": (self.max_position_embeddings, d),
            "embeddings.token_type_embeddings.weight": (self.type_vocab_size, d),
            "embeddings.LayerNorm.weight": (d,),
            "embeddings.LayerNorm.bias": (d,),
        }
        for i in range(self.num_hidden_layers):
            p = f"encoder.layer.{i}."
            for proj in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense"):
                out[f"{p}{proj}.weight"], out[f"{p}{proj}.bias"] = (d, d), (d,)
            for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
                out[f"{p}{norm}.weight"], out[f"{p}{norm}.bias"] = (d,), (d,)
            out[f"{p}intermediate.dense.weight"], out[f"{p}intermediate.dense.bias"] = (f, d), (f,)
            out[f"{p}output.dense.weight"], out[f"{p}output.dense.bias"] = (d, f), (d,)
        return out


def read_shape_config(metadata: Mapping[str, str], source: Path, expected_format: str) -> dict[str, Any]:
    """The encoder shape a torch part declares, after the checks every architecture here shares: the right format,
    exact GELU (the only activation the plain-PyTorch models implement), and whole attention heads."""
    if metadata.get("format") != expected_format or "config" not in metadata:
        raise ValueError(f"{source} is not a '{expected_format}' backbone file (metadata {dict(metadata)}); "
                         "the bundle was built by an incompatible exporter")
    config: dict[str, Any] = json.loads(metadata["config"])
    if config.get("hidden_act") != "gelu":
        raise ValueError(f"{source}: activation '{config.get('hidden_act')}' is not supported (only exact 'gelu')")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ValueError(f"{source}: hidden size {config['hidden_size']} is not a multiple of "
                         f"{config['num_attention_heads']} heads")
    return config


class ExpertCounts(NamedTuple):
    """How many shared (gated) and private (ungated, never sent) experts each adapter has."""

    shared: int
    private: int = 0


def count_experts(names: Sequence[str]) -> ExpertCounts:
    """The DeMA expert counts, read from the manifest's trainable names (every slot has the same)."""
    found: dict[str, set[int]] = {"experts": set(), "private": set()}
    for name in names:
        if match := _EXPERT_NAME.match(name):
            found[match.group(2)].add(int(match.group(3)))
    for family, indices in found.items():
        if indices != set(range(len(indices))) or (family == "experts" and not indices):
            raise ValueError(f"cannot read the DeMA {family} count from the trainable names (found "
                             f"{sorted(indices)})")
    return ExpertCounts(len(found["experts"]), len(found["private"]))


class AdapterEncoderClassifier:
    """Frozen encoder -> DeMA adapters after the manifest's slot blocks -> masked mean pool -> linear head.

    The frozen weights are held here; the trainable tensors are passed to `logits` by name (the manifest's
    names), so the trainer owns them and their optimizer state.
    """

    def __init__(self, shape: EncoderShape, weights: Mapping[str, Tensor], slot_blocks: Sequence[int],
                 experts: ExpertCounts) -> None:
        self.slots_after = slots_after_blocks(slot_blocks, shape.num_hidden_layers)
        self.last_slot = len(slot_blocks) - 1
        self.torch = load_torch()
        self.shape = shape
        self.weights = dict(weights)
        self.experts = experts
        self.head_dim = shape.hidden_size // shape.num_attention_heads
        self.scaling = self.head_dim**-0.5

    def classify(self, params: Mapping[str, Tensor], input_ids: Tensor, attention_mask: Tensor
                 ) -> tuple[Tensor, Tensor]:
        """Logits and the representation (the last adapter's z, masked-mean pooled), as the export's classify."""
        torch = self.torch
        functional = torch.nn.functional
        w, shape = self.weights, self.shape
        d = shape.hidden_size
        seq = input_ids.shape[1]
        # Embeddings: word + token type (all zeros, as the graphs are traced without token_type_ids) + position.
        hidden = functional.embedding(input_ids, w["embeddings.word_embeddings.weight"])
        hidden = hidden + w["embeddings.token_type_embeddings.weight"][0]
        hidden = hidden + w["embeddings.position_embeddings.weight"][:seq]
        hidden = functional.layer_norm(hidden, (d,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
                                       shape.layer_norm_eps)
        mask = attention_mask.to(hidden.dtype)
        # transformers' eager path: 0 where attended, the dtype's minimum where padded, added to the scores.
        additive = (1.0 - mask)[:, None, None, :] * torch.finfo(hidden.dtype).min
        last: list[Tensor] = []
        for block in range(shape.num_hidden_layers):
            hidden = self._block(block, hidden, additive)
            hidden = run_adapters(torch, self.slots_after.get(block, ()), params, hidden, self.experts,
                                  self.last_slot, last)
        weights = mask.unsqueeze(-1)
        count = weights.sum(dim=1).clamp(min=1.0)
        pooled = (hidden * weights).sum(dim=1) / count
        logits = functional.linear(pooled, params["head.weight"], params["head.bias"])
        return logits, (last[-1] * weights).sum(dim=1) / count

    def _block(self, index: int, hidden: Tensor, additive: Tensor) -> Tensor:
        torch = self.torch
        functional = torch.nn.functional
        w, shape = self.weights, self.shape
        p = f"encoder.layer.{index}."
        batch, seq, d = hidden.shape
        heads = shape.num_attention_heads

        def project(name: str) -> Tensor:
            out = functional.linear(hidden, w[f"{p}attention.self.{name}.weight"], w[f"{p}attention.self.{name}.bias"])
            return out.view(batch, seq, heads, self.head_dim).transpose(1, 2)

        query, key, value = project("query"), project("key"), project("value")
        scores = torch.matmul(query, key.transpose(2, 3)) * self.scaling + additive
        context = torch.matmul(torch.softmax(scores, dim=-1), value).transpose(1, 2).reshape(batch, seq, d)
        attended = functional.layer_norm(
            functional.linear(context, w[f"{p}attention.output.dense.weight"], w[f"{p}attention.output.dense.bias"])
            + hidden, (d,), w[f"{p}attention.output.LayerNorm.weight"], w[f"{p}attention.output.LayerNorm.bias"],
            shape.layer_norm_eps)
        inner = functional.gelu(functional.linear(attended, w[f"{p}intermediate.dense.weight"],
                                                  w[f"{p}intermediate.dense.bias"]))
        return functional.layer_norm(
            functional.linear(inner, w[f"{p}output.dense.weight"], w[f"{p}output.dense.bias"]) + attended,
            (d,), w[f"{p}output.LayerNorm.weight"], w[f"{p}output.LayerNorm.bias"], shape.layer_norm_eps)


def adapter_project(torch: Any, slot: int, params: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
    """export/dema/layer.py's z = GELU(W_in LN(h)): the tokens' points in the shared r-space."""
    functional = torch.nn.functional
    p = f"adapters.{slot}."
    normed = functional.layer_norm(hidden, (hidden.shape[-1],), params[f"{p}ln.weight"], params[f"{p}ln.bias"],
                                   ADAPTER_LN_EPS)
    return functional.gelu(functional.linear(normed, params[f"{p}w_in.weight"], params[f"{p}w_in.bias"]))


def adapter_mix(torch: Any, slot: int, params: Mapping[str, Tensor], hidden: Tensor, z: Tensor,
                experts: ExpertCounts) -> Tensor:
    """export/dema/layer.py's h + W_out · (sum_e softmax(W_g z)_e · B_e GELU(A_e z) + sum_p B_p GELU(A_p z))."""
    functional = torch.nn.functional
    p = f"adapters.{slot}."

    def expert(family: str, e: int) -> Tensor:
        inner = functional.gelu(functional.linear(z, params[f"{p}{family}.{e}.a.weight"]))
        return functional.linear(inner, params[f"{p}{family}.{e}.b.weight"])

    gate = torch.softmax(functional.linear(z, params[f"{p}w_g.weight"]), dim=-1)
    mixed: Tensor = 0
    for e in range(experts.shared):
        mixed = mixed + gate[..., e : e + 1] * expert("experts", e)
    for e in range(experts.private):
        mixed = mixed + expert("private", e)
    return hidden + functional.linear(mixed, params[f"{p}w_out.weight"], params[f"{p}w_out.bias"])


def run_adapters(torch: Any, slots: Sequence[int], params: Mapping[str, Tensor], hidden: Tensor,
                 experts: ExpertCounts, last_slot: int, representation: list[Tensor]) -> Tensor:
    """The adapters after one block, in slot order; the last slot's z is appended to ``representation``."""
    for slot in slots:
        z = adapter_project(torch, slot, params, hidden)
        if slot == last_slot:
            representation.append(z)
        hidden = adapter_mix(torch, slot, params, hidden, z, experts)
    return hidden


def slots_after_blocks(slot_blocks: Sequence[int], layers: int) -> dict[int, list[int]]:
    """Block index -> the adapter slots that follow it, in slot order (as the export's hooks run them)."""
    if any(not 0 <= b < layers for b in slot_blocks):
        raise ValueError(f"slot blocks {list(slot_blocks)} do not fit {layers} blocks")
    after: dict[int, list[int]] = {}
    for slot, block in enumerate(slot_blocks):
        after.setdefault(block, []).append(slot)
    return after


def read_backbone_file(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The torch part's metadata and tensors (no gradients)."""
    from safetensors import safe_open

    load_torch()
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        weights = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
    return metadata, weights


def check_weights(path: Path, weights: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
                  ) -> dict[str, Tensor]:
    """The expected tensors as float32 without gradients, or a ValueError naming what is missing or misshapen."""
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(n for n in expected if n in weights and tuple(weights[n].shape) != expected[n])
    if missing or wrong:
        raise ValueError(f"{path}: backbone weights do not match the encoder shape (missing {missing[:3]}, "
                         f"wrong shape {wrong[:3]})")
    return {n: weights[n].float().requires_grad_(False) for n in expected}
