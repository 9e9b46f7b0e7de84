"""Per-group running sums give exactly the aggregate of the individual updates, for every rule the engine runs."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import ClientUpdate, FederatedState, make_strategy
from coordinator.aggregation.streaming import GroupAccumulator


def test_group_mean_by_hand() -> None:
    acc = GroupAccumulator()
    acc.add(ClientUpdate("a1", "small", 1, {"w": np.array([1.0, 2.0], dtype=np.float32)}))
    acc.add(ClientUpdate("a2", "small", 3, {"w": np.array([5.0, 6.0], dtype=np.float32)}))
    (pseudo,) = acc.as_updates()
    assert pseudo.group == "small" and pseudo.num_samples == 4 and len(acc) == 2
    np.testing.assert_array_equal(pseudo.tensors["w"], np.array([4.0, 5.0], dtype=np.float32))  # (1*1+3*5)/4


@pytest.mark.parametrize("method", ["heterotune", "heterotune-noalign"])
def test_streaming_equals_individual_updates(method: str) -> None:
    rng = np.random.default_rng(0)
    state = FederatedState(global_tensors={"g": rng.normal(size=(4, 3)).astype(np.float32)},
                           group_tensors={"small": {"s": rng.normal(size=5).astype(np.float32)},
                                          "large": {"l": rng.normal(size=2).astype(np.float32)}})
    updates = []
    for i, (group, own) in enumerate([("small", "s"), ("small", "s"), ("large", "l"), ("large", "l"), ("large", "l")]):
        tensors = {"g": rng.normal(size=(4, 3)).astype(np.float32),
                   own: rng.normal(size=state.group_tensors[group][own].shape).astype(np.float32)}
        updates.append(ClientUpdate(f"a{i}", group, int(rng.integers(1, 50)), tensors))
    acc = GroupAccumulator()
    for update in updates:
        acc.add(update)
    strategy = make_strategy(method)
    direct = strategy.aggregate(state, updates, 1).state
    streamed = strategy.aggregate(state, acc.as_updates(), 1).state
    np.testing.assert_allclose(streamed.global_tensors["g"], direct.global_tensors["g"], rtol=1e-5, atol=1e-6)
    for group, tensors in direct.group_tensors.items():
        for name, value in tensors.items():
            np.testing.assert_allclose(streamed.group_tensors[group][name], value, rtol=1e-5, atol=1e-6)
