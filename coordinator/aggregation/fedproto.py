"""``fedproto``: prototype exchange (FedProto-style) in the shared r-space.

Why: backbones of different widths cannot average weights they do not share, but every DeMA
adapter maps into the same r-dimensional space, so per-class mean representations there are
comparable across backbones and cost only ``classes x r`` floats per round.

Exact definition (this project's):

* State. ``global_tensors`` holds, for every class ``c`` of the task (its index in the task's labels, as
  protocols/prototypes.py names them), the pair
  ``"proto.{c}"`` (shape ``(r,)``, the global prototype) and ``"proto_count.{c}"`` (shape ``()``,
  the number of samples behind it). No other global-scope tensors are allowed. Group-scope tensors,
  if the run configures any, are aggregated by the usual sample-weighted group mean.
* Update. Agent k sends ``"proto.{c}"`` = its mean r-space representation of the training samples
  of class c, and ``"proto_count.{c}"`` = how many samples that mean is over (finite, >= 0), for
  any subset of the classes (both names of a pair or neither), plus all its group-scope tensors.
  A class with count 0 is treated as not sent.
* Aggregation. For each class c, with ``S_c`` the agents that sent a positive count for c:
  ``proto.c <- sum_{k in S_c} m_kc p_kc / sum_{k in S_c} m_kc`` and
  ``proto_count.c <- sum_{k in S_c} m_kc`` (this round's support, replacing the previous count).
  Classes nobody saw this round (``S_c`` empty) keep both previous values. ``num_samples`` does not
  weight prototypes: the per-class counts are the exact weights of a pooled class mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator.aggregation.base import (
    AggregationResult,
    ClientUpdate,
    FederatedState,
    check_shape,
    validate_common,
)
from coordinator.aggregation.mean import (
    as_float32,
    group_means,
    sample_counts,
    updates_by_group,
    weighted_mean,
)
from protocols.prototypes import count_class, count_name, prototype_class, prototype_name


def prototype_classes(state: FederatedState) -> list[str]:
    """Class names of the state's prototypes; raises ValueError if the global scope is malformed."""
    protos: set[str] = set()
    counts: set[str] = set()
    for name, value in state.global_tensors.items():
        counted, proto = count_class(name), prototype_class(name)
        if counted is not None:
            counts.add(counted)
            if np.shape(value) != ():
                raise ValueError(f"fedproto: {name!r} must be a scalar, has shape {np.shape(value)}")
        elif proto is not None:
            protos.add(proto)
            if np.ndim(value) != 1:
                raise ValueError(f"fedproto: {name!r} must have shape (r,), has {np.shape(value)}")
        else:
            raise ValueError(
                f"fedproto: global tensor {name!r} is not a prototype; only 'proto.<class>' and "
                "'proto_count.<class>' may be global scope in this method"
            )
    if protos != counts:
        raise ValueError(
            f"fedproto: prototypes without counts {sorted(protos - counts)}, "
            f"counts without prototypes {sorted(counts - protos)}"
        )
    return sorted(protos)


def _validate(state: FederatedState, updates: Sequence[ClientUpdate], classes: list[str]) -> None:
    validate_common(state, updates)
    allowed = set(state.global_tensors)
    for update in updates:
        group_names = state.group_tensors[update.group]
        missing = sorted(set(group_names) - set(update.tensors))
        if missing:
            raise ValueError(
                f"update from agent {update.agent_id!r} (group {update.group!r}) lacks tensors {missing}"
            )
        extra = sorted(set(update.tensors) - allowed - set(group_names))
        if extra:
            raise ValueError(
                f"update from agent {update.agent_id!r} (group {update.group!r}) has unexpected "
                f"tensors {extra}"
            )
        for name in group_names:
            check_shape(update, name, group_names[name])
        for c in classes:
            proto, count = prototype_name(c), count_name(c)
            if (proto in update.tensors) != (count in update.tensors):
                raise ValueError(
                    f"update from agent {update.agent_id!r}: class {c!r} needs both {proto!r} and {count!r}"
                )
            if proto in update.tensors:
                check_shape(update, proto, state.global_tensors[proto])
                check_shape(update, count, state.global_tensors[count])
                m = float(update.tensors[count])
                if not (math.isfinite(m) and m >= 0):
                    raise ValueError(
                        f"update from agent {update.agent_id!r}: {count!r} = {m}; must be finite and >= 0"
                    )


@dataclass(frozen=True)
class FedProto:
    """Count-weighted mean of per-class prototypes across all agents and backbones."""

    name: ClassVar[str] = "fedproto"

    def aggregate(
        self, state: FederatedState, updates: Sequence[ClientUpdate], round_id: int
    ) -> AggregationResult:
        classes = prototype_classes(state)
        _validate(state, updates, classes)
        new_global: dict[str, np.ndarray] = dict(state.global_tensors)
        per_class: dict[str, dict[str, Any]] = {}
        for c in classes:
            proto, count = prototype_name(c), count_name(c)
            seen = [
                (u.tensors[proto], float(u.tensors[count]))
                for u in updates
                if proto in u.tensors and float(u.tensors[count]) > 0
            ]
            if seen:
                new_global[proto] = weighted_mean([p for p, _ in seen], [m for _, m in seen])
                new_global[count] = np.asarray(sum(m for _, m in seen), dtype=np.float64)
            per_class[c] = {"agents": len(seen), "count": sum(m for _, m in seen)}
        by_group = updates_by_group(updates)
        new_state = FederatedState(
            global_tensors=as_float32(new_global), group_tensors=group_means(state, by_group)
        )
        diagnostics: dict[str, Any] = {
            "strategy": self.name,
            "round_id": round_id,
            "num_updates": len(updates),
            "group_samples": sample_counts(by_group),
            "classes": per_class,
            "unseen_classes": [c for c in classes if per_class[c]["agents"] == 0],
        }
        return AggregationResult(state=new_state, diagnostics=diagnostics)
