"""How consensus distillation's class probabilities travel: one tensor name shared by agent, engine and rule.

Every device of a run holds the same small *public, unlabelled* set (P samples, e.g. text or images anyone
may hold). After its local steps a device sends its class probabilities on that set, ``distill.probs``
(float32 ``(P, classes)``); the coordinator averages them into the consensus it sends back under the same
name, and the device trains towards the consensus's labels next round. Probabilities are model-agnostic, so
they cross backbones of any width or depth, which the adapter tensors can only do through the r-space.
"""

from __future__ import annotations

DISTILL_PROBS = "distill.probs"


def is_distillation_name(name: str) -> bool:
    return name == DISTILL_PROBS


def distillation_shapes(public_samples: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The distillation tensors of a run with ``public_samples`` public samples (none when it has none)."""
    return {DISTILL_PROBS: (public_samples, num_classes)} if public_samples > 0 else {}
