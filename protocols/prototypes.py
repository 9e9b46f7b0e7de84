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


def prototype_name(class_key: int | str) -> str:
    """The tensor that carries class ``class_key``'s mean representation."""
    return f"{PROTO_PREFIX}{class_key}"


def count_name(class_key: int | str) -> str:
    """The tensor that carries how many samples class ``class_key``'s mean is over."""
    return f"{COUNT_PREFIX}{class_key}"


def prototype_class(name: str) -> str | None:
    """The class key of a prototype-mean tensor, or None for any other name (counts included)."""
    return name[len(PROTO_PREFIX):] if name.startswith(PROTO_PREFIX) else None


def count_class(name: str) -> str | None:
    """The class key of a count tensor, or None for any other name."""
    return name[len(COUNT_PREFIX):] if name.startswith(COUNT_PREFIX) else None


def prototype_shapes(num_classes: int, rank: int) -> dict[str, tuple[int, ...]]:
    """Every prototype tensor's name and shape for a task of ``num_classes`` classes in an r-space of ``rank``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for index in range(num_classes):
        shapes[prototype_name(index)] = (rank,)
        shapes[count_name(index)] = ()
    return shapes


def is_prototype_name(name: str) -> bool:
    return prototype_class(name) is not None or count_class(name) is not None
