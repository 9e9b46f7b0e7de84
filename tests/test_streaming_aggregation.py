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


def _proto_update(agent: str, group: str, n: int, protos: dict[int, tuple[list[float], float]]) -> ClientUpdate:
    tensors = {}
    for index, (proto, count) in protos.items():
        tensors[f"proto.{index}"] = np.array(proto, dtype=np.float32)
        tensors[f"proto_count.{index}"] = np.asarray(count, dtype=np.float32)
    return ClientUpdate(agent, group, n, tensors)


def test_fedproto_prototypes_are_summed_by_class_count_not_by_samples() -> None:
    acc = GroupAccumulator()
    # n_train (100, 1) must not matter: class 0 is seen 1x by a1 and 3x by a2 -> (1*[2,0] + 3*[6,4]) / 4 = [5, 3]
    acc.add(_proto_update("a1", "small", 100, {0: ([2.0, 0.0], 1.0), 1: ([7.0, 7.0], 0.0)}))
    acc.add(_proto_update("a2", "small", 1, {0: ([6.0, 4.0], 3.0), 1: ([0.0, 0.0], 0.0)}))
    (pseudo,) = acc.as_updates()
    np.testing.assert_array_equal(pseudo.tensors["proto.0"], [5.0, 3.0])
    assert float(pseudo.tensors["proto_count.0"]) == 4.0 and pseudo.tensors["proto_count.0"].shape == ()
    np.testing.assert_array_equal(pseudo.tensors["proto.1"], [0.0, 0.0])  # nobody saw class 1: zero, count 0
    assert float(pseudo.tensors["proto_count.1"]) == 0.0


def test_fedproto_streaming_equals_individual_updates() -> None:
    rng = np.random.default_rng(1)
    state = FederatedState(global_tensors={"proto.0": np.zeros(3, np.float32), "proto_count.0": np.asarray(0.0),
                                           "proto.1": np.ones(3, np.float32), "proto_count.1": np.asarray(2.0)},
                           group_tensors={"small": {}, "large": {}})
    updates = [_proto_update(f"a{i}", group, int(rng.integers(1, 50)),
                             {0: (list(rng.normal(size=3)), float(rng.integers(0, 9))),
                              1: (list(rng.normal(size=3)), float(rng.integers(0, 2)))})
               for i, group in enumerate(["small", "small", "large", "large", "large"])]
    acc = GroupAccumulator()
    for update in updates:
        acc.add(update)
    strategy = make_strategy("fedproto")
    direct = strategy.aggregate(state, updates, 1).state
    streamed = strategy.aggregate(state, acc.as_updates(), 1).state
    for name, value in direct.global_tensors.items():
        np.testing.assert_allclose(streamed.global_tensors[name], value, rtol=1e-5, atol=1e-6)
