"""Data model shared by every aggregation strategy, plus input validation.

The round engine hands a strategy the current :class:`FederatedState` and the accepted
:class:`ClientUpdate` objects of one round; the strategy returns a new state and diagnostics.
Strategies are pure: they never mutate their inputs and keep no state between rounds (everything a
strategy needs, e.g. a seed, is configuration fixed at construction), so a resumed run aggregates
exactly like an uninterrupted one.

Scopes are encoded by *where* a tensor lives in the state, not by its name: a name in
``state.global_tensors`` is global scope (same shape on every backbone, aggregated across all
agents); a name in ``state.group_tensors[g]`` is group scope for backbone group ``g``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

TensorDict = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClientUpdate:
    """What one agent returned in one round.

    ``tensors`` holds exactly the agent's shared tensors (global and group scope), float32.
    ``num_samples`` is n_k, the number of training samples behind the update (> 0).
    """

    agent_id: str
    group: str
    num_samples: int
    tensors: TensorDict


@dataclass
class FederatedState:
    """The coordinator's copy of every shared tensor.

    ``global_tensors``: scope "global", the same shape on every backbone.
    ``group_tensors``: per backbone group, scope "group". Every group that may send updates must
    have an entry (possibly an empty dict), because the coordinator has to know a group's
    initial tensors before it can aggregate them.
    """

    global_tensors: TensorDict
    group_tensors: dict[str, TensorDict]


@dataclass
class AggregationResult:
    """A new state plus JSON-friendly diagnostics (plain str/int/float/None/list/dict)."""

    state: FederatedState
    diagnostics: dict[str, Any]


class Strategy(Protocol):
    """One aggregation rule.

    ``name`` is read-only here (a property) so that frozen dataclasses with a ``ClassVar`` name
    satisfy the protocol; any object with a readable ``name`` attribute does.
    """

    @property
    def name(self) -> str: ...

    def aggregate(
        self, state: FederatedState, updates: Sequence[ClientUpdate], round_id: int
    ) -> AggregationResult: ...


def validate_common(state: FederatedState, updates: Sequence[ClientUpdate]) -> None:
    """Checks that do not depend on which tensors a strategy expects.

    Raises ValueError on a name that is in both scopes (it would be aggregated twice), on a
    non-positive sample count (it would silently drop or invert an agent's weight), on a repeated
    agent (a replayed update would count twice) and on a group the state does not know (its group
    tensors would have no initial value to aggregate into).
    """
    for group, tensors in state.group_tensors.items():
        clash = sorted(set(tensors) & set(state.global_tensors))
        if clash:
            raise ValueError(f"tensors {clash} are both global scope and group scope (group {group!r})")
    seen: set[str] = set()
    for update in updates:
        if update.num_samples <= 0:
            raise ValueError(
                f"update from agent {update.agent_id!r} has num_samples={update.num_samples}; must be > 0"
            )
        if update.agent_id in seen:
            raise ValueError(f"agent {update.agent_id!r} sent more than one update in this round")
        seen.add(update.agent_id)
        if update.group not in state.group_tensors:
            raise ValueError(
                f"update from agent {update.agent_id!r} is for group {update.group!r}, which the state "
                f"does not know (known groups: {sorted(state.group_tensors)}); add the group to "
                "state.group_tensors (an empty dict if it has no group-scope tensors)"
            )


def check_shape(update: ClientUpdate, name: str, expected: np.ndarray) -> None:
    """Raise ValueError if the update's tensor ``name`` does not have the state's shape."""
    got = np.shape(update.tensors[name])
    if got != expected.shape:
        raise ValueError(
            f"update from agent {update.agent_id!r}: tensor {name!r} has shape {got}, "
            f"expected {expected.shape}"
        )


def validate_updates(state: FederatedState, updates: Sequence[ClientUpdate]) -> None:
    """Full validation for strategies that expect every shared tensor from every agent.

    An update must carry exactly the global names plus its group's names, with the state's
    shapes. Unexpected names are rejected too: they mean the agent and the coordinator disagree
    about scopes, and silently dropping them could hide a tensor meant to stay on the device.
    """
    validate_common(state, updates)
    for update in updates:
        expected: TensorDict = {**state.global_tensors, **state.group_tensors[update.group]}
        missing = sorted(set(expected) - set(update.tensors))
        if missing:
            raise ValueError(
                f"update from agent {update.agent_id!r} (group {update.group!r}) lacks tensors {missing}"
            )
        extra = sorted(set(update.tensors) - set(expected))
        if extra:
            raise ValueError(
                f"update from agent {update.agent_id!r} (group {update.group!r}) has unexpected tensors "
                f"{extra}; only global- and group-scope tensors may be uploaded"
            )
        for name, reference in expected.items():
            check_shape(update, name, reference)
