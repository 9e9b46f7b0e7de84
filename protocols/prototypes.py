"""How FedProto's class prototypes travel: tensor names shared by the agent, the engine and the aggregation rule.

Prototypes are not trainable tensors of a bundle, so they are named here rather than in the manifest: class
``i`` of the task (its index in the task's labels, which every bundle of a run shares) travels as
``proto.i`` (float32 ``(r,)``, a mean representation in the DeMA r-space) and ``proto_count.i`` (float32 ``()``,
how many training samples that mean is over). Indices, not label strings: labels may hold characters a tensor
name should not ("T-shirt/top").
"""

from __future__ import annotations

PROTO_PREFIX = "proto."
COUNT_PREFIX = "proto_count."


def prototype_shapes(num_classes: int, rank: int) -> dict[str, tuple[int, ...]]:
    """Every prototype tensor's name and shape for a task of ``num_classes`` classes in an r-space of ``rank``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for index in range(num_classes):
        shapes[f"{PROTO_PREFIX}{index}"] = (rank,)
        shapes[f"{COUNT_PREFIX}{index}"] = ()
    return shapes


def is_prototype_name(name: str) -> bool:
    return name.startswith((PROTO_PREFIX, COUNT_PREFIX))
