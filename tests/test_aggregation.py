"""Aggregation rules pinned on small hand-computed tensors.

Every expected number below is a literal worked out by hand in the comment next to it; the code
under test is never used to produce an expectation.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from coordinator.aggregation import (
    STRATEGY_NAMES,
    ClientUpdate,
    FederatedState,
    FedProto,
    GroupFedAvg,
    HeteroTune,
    HeteroTuneNoAlign,
    LocalOnly,
    Strategy,
    TensorDict,
    make_strategy,
)
from coordinator.aggregation.cmga import group_weights, project_conflicts, seeded_orders
from coordinator.aggregation.mean import weighted_mean

SQRT2 = math.sqrt(2.0)


def a32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def upd(agent: str, group: str, n: int, **tensors: npt.ArrayLike) -> ClientUpdate:
    return ClientUpdate(
        agent_id=agent,
        group=group,
        num_samples=n,
        tensors={k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()},
    )


def state_of(global_tensors: TensorDict, group_tensors: dict[str, TensorDict]) -> FederatedState:
    return FederatedState(global_tensors=global_tensors, group_tensors=group_tensors)


def close(actual: np.ndarray, expected: npt.ArrayLike, tol: float = 1e-6) -> None:
    np.testing.assert_allclose(actual, np.asarray(expected, dtype=np.float64), rtol=0, atol=tol)


# --------------------------------------------------------------------------- shared helpers


def test_weighted_mean_helper() -> None:
    # (1*[1,2] + 3*[5,6]) / 4 = [16,20]/4 = [4,5]
    out = weighted_mean([a32(1, 2), a32(5, 6)], [1, 3])
    close(out, [4.0, 5.0])
    assert out.dtype == np.float64


def test_group_weights_tau() -> None:
    # N = 4, 2. tau=1: 4/6, 2/6. tau=0: 1/2, 1/2. tau=2: 16/20, 4/20.
    assert group_weights({"a": 4, "b": 2}, 1.0) == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert group_weights({"a": 4, "b": 2}, 0.0) == pytest.approx({"a": 0.5, "b": 0.5})
    assert group_weights({"a": 4, "b": 2}, 2.0) == pytest.approx({"a": 0.8, "b": 0.2})


# --------------------------------------------------------------------------- group scope


@pytest.mark.parametrize("strategy", [HeteroTune(), HeteroTuneNoAlign(), GroupFedAvg()], ids=lambda s: s.name)
def test_group_scope_weighted_mean(strategy: Strategy) -> None:
    state = state_of({}, {"g1": {"w": a32(0, 0)}, "g2": {"w": a32(9, 9)}})
    updates = [upd("k1", "g1", 1, w=[1, 2]), upd("k2", "g1", 3, w=[5, 6])]
    out = strategy.aggregate(state, updates, round_id=0).state
    # g1: (1*[1,2] + 3*[5,6]) / 4 = [4,5]
    close(out.group_tensors["g1"]["w"], [4.0, 5.0])
    # g2 sent nothing this round: unchanged
    close(out.group_tensors["g2"]["w"], [9.0, 9.0])
    assert out.group_tensors["g1"]["w"].dtype == np.float32


# --------------------------------------------------------------------------- CMGA, two groups


def two_group_conflict() -> tuple[FederatedState, list[ClientUpdate]]:
    """theta = [1,1].

    Group a: a1 (n=1) theta=[5,1] -> D=[4,0]; a2 (n=3) theta=[1,1] -> D=[0,0].
             G_a = (1*[4,0] + 3*[0,0]) / 4 = [1,0]; N_a = 4.
    Group b: b1 (n=2) theta=[0,2] -> D=[-1,1]. G_b = [-1,1]; N_b = 2.
    <G_a,G_b> = -1 < 0: a conflict.
    """
    state = state_of({"A": a32(1, 1)}, {"a": {}, "b": {}})
    updates = [
        upd("a1", "a", 1, A=[5, 1]),
        upd("a2", "a", 3, A=[1, 1]),
        upd("b1", "b", 2, A=[0, 2]),
    ]
    return state, updates


def test_cmga_two_group_projection_vectors() -> None:
    # a' = [1,0] - (-1/|G_b|^2=2) [-1,1] = [1,0] + [-0.5,0.5] = [0.5,0.5]
    # b' = [-1,1] - (-1/|G_a|^2=1) [1,0] = [-1,1] + [1,0] = [0,1]
    grads = {"a": np.array([1.0, 0.0]), "b": np.array([-1.0, 1.0])}
    projected, fired = project_conflicts(grads, {"a": ["b"], "b": ["a"]})
    close(projected["a"], [0.5, 0.5])
    close(projected["b"], [0.0, 1.0])
    assert fired == [("a", "b"), ("b", "a")]
    # the input vectors are untouched
    close(grads["a"], [1.0, 0.0])
    close(grads["b"], [-1.0, 1.0])


def test_cmga_two_group_final_theta_and_diagnostics() -> None:
    state, updates = two_group_conflict()
    result = HeteroTune().aggregate(state, updates, round_id=0)
    # tau=1: w_a = 4/6 = 2/3, w_b = 2/6 = 1/3
    # step = 2/3*[0.5,0.5] + 1/3*[0,1] = [1/3, 1/3 + 1/3] = [1/3, 2/3]
    # theta = [1,1] + [1/3, 2/3] = [4/3, 5/3]
    close(result.state.global_tensors["A"], [4 / 3, 5 / 3])
    assert result.state.global_tensors["A"].dtype == np.float32
    diag = result.diagnostics
    assert diag["group_weights"] == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert diag["group_samples"] == {"a": 4, "b": 2}
    tensor = diag["tensors"]["A"]
    # cos = -1 / (|[1,0]| |[-1,1]|) = -1/sqrt(2) = -0.70710678
    assert tensor["cosines"] == {"a|b": pytest.approx(-0.70710678)}
    assert tensor["projections"] == [["a", "b"], ["b", "a"]]
    # |G_a| = 1, |G_b| = sqrt(2); after projection |[0.5,0.5]| = sqrt(0.5) = 0.70710678, |[0,1]| = 1
    assert tensor["norms"] == pytest.approx({"a": 1.0, "b": SQRT2})
    assert tensor["projected_norms"] == pytest.approx({"a": 0.70710678, "b": 1.0})
    assert diag["num_projections"] == 2


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # tau=0: w = 1/2, 1/2: step = [0.25,0.25] + [0,0.5] = [0.25,0.75] -> [1.25, 1.75]
        ({"tau": 0.0}, [1.25, 1.75]),
        # tau=2: w = 16/20, 4/20 = 0.8, 0.2: step = [0.4,0.4] + [0,0.2] = [0.4,0.6] -> [1.4, 1.6]
        ({"tau": 2.0}, [1.4, 1.6]),
        # eta_s=0.5, tau=1: step [1/3,2/3] halved = [1/6,1/3] -> [7/6, 4/3]
        ({"eta_s": 0.5}, [7 / 6, 4 / 3]),
        # both: tau=0 step [0.25,0.75] * 2 = [0.5,1.5] -> [1.5, 2.5]
        ({"tau": 0.0, "eta_s": 2.0}, [1.5, 2.5]),
    ],
)
def test_cmga_tau_and_eta_s(options: dict[str, Any], expected: list[float]) -> None:
    state, updates = two_group_conflict()
    out = HeteroTune(**options).aggregate(state, updates, round_id=0).state
    close(out.global_tensors["A"], expected)


def test_cmga_projects_each_tensor_independently_and_flattens_matrices() -> None:
    # Tensor M is the two-group conflict laid out as a 2x1 matrix (same numbers, so same answer:
    # [4/3, 5/3]); tensor P has G_a = [1,0], G_b = [1,1] (dot 1 > 0), so no projection:
    # step = 2/3*[1,0] + 1/3*[1,1] = [1, 1/3] -> theta [0,0] + step = [1, 1/3].
    state = state_of({"M": a32(1, 1).reshape(2, 1), "P": a32(0, 0)}, {"a": {}, "b": {}})
    updates = [
        upd("a1", "a", 1, M=np.array([[5.0], [1.0]]), P=[4, 0]),
        upd("a2", "a", 3, M=np.array([[1.0], [1.0]]), P=[0, 0]),
        upd("b1", "b", 2, M=np.array([[0.0], [2.0]]), P=[1, 1]),
    ]
    result = HeteroTune().aggregate(state, updates, round_id=0)
    close(result.state.global_tensors["M"], [[4 / 3], [5 / 3]])
    close(result.state.global_tensors["P"], [1.0, 1 / 3])
    assert result.diagnostics["tensors"]["M"]["projections"] == [["a", "b"], ["b", "a"]]
    assert result.diagnostics["tensors"]["P"]["projections"] == []


# --------------------------------------------------------------------------- CMGA, three groups


def three_group_state() -> tuple[FederatedState, list[ClientUpdate]]:
    """theta = [1,1]; one agent per group, n = 1 each (tau=1 -> w = 1/3 each).

    G_a = [1,0], G_b = [-1,1], G_c = [0,-1].
    <a,b> = -1, <a,c> = 0, <b,c> = -1;  |a|^2 = 1, |b|^2 = 2, |c|^2 = 1.
    """
    state = state_of({"A": a32(1, 1)}, {"a": {}, "b": {}, "c": {}})
    updates = [
        upd("ka", "a", 1, A=[2, 1]),
        upd("kb", "b", 1, A=[0, 2]),
        upd("kc", "c", 1, A=[1, 0]),
    ]
    return state, updates


def test_seeded_order_matches_numpy_stream() -> None:
    # Where the orders used below come from: one default_rng(seed + round_id) per round; groups in
    # sorted order each draw permutation(2) over their two other groups (sorted).
    # default_rng(1): [0,1], [0,1], [1,0]  -> a: (b,c), b: (a,c), c: (b,a)
    # default_rng(3): [1,0], [0,1], [0,1]  -> a: (c,b), b: (a,c), c: (a,b)
    rng = np.random.default_rng(1)
    assert [rng.permutation(2).tolist() for _ in range(3)] == [[0, 1], [0, 1], [1, 0]]
    rng = np.random.default_rng(3)
    assert [rng.permutation(2).tolist() for _ in range(3)] == [[1, 0], [0, 1], [0, 1]]
    assert seeded_orders(["c", "a", "b"], 0, 1) == {"a": ["b", "c"], "b": ["a", "c"], "c": ["b", "a"]}
    assert seeded_orders(["a", "b", "c"], 0, 3) == {"a": ["c", "b"], "b": ["a", "c"], "c": ["a", "b"]}
    # seed and round_id enter only as their sum
    assert seeded_orders(["a", "b", "c"], 1, 0) == seeded_orders(["a", "b", "c"], 0, 1)


def test_cmga_three_groups_round1_sequential_against_originals() -> None:
    """Orders (seed 0, round 1): a: (b,c), b: (a,c), c: (b,a).

    a: vs b: <[1,0],[-1,1]> = -1 -> [1,0] + 1/2[-1,1] = [0.5,0.5]
       vs c: <[0.5,0.5],[0,-1]> = -0.5 -> [0.5,0.5] + 0.5[0,-1] = [0.5,0]
    b: vs a: <[-1,1],[1,0]> = -1 -> [-1,1] + [1,0] = [0,1]
       vs c: <[0,1],[0,-1]> = -1 -> [0,1] + [0,-1] = [0,0]
    c: vs b: <[0,-1],[-1,1]> = -1 -> [0,-1] + 1/2[-1,1] = [-0.5,-0.5]
       vs a: <[-0.5,-0.5],[1,0]> = -0.5 -> [-0.5,-0.5] + 0.5[1,0] = [0,-0.5]
    step = ([0.5,0] + [0,0] + [0,-0.5]) / 3 = [1/6, -1/6]; theta = [7/6, 5/6].

    Wrong variants give other answers:
    * projecting against already-projected vectors (a' = [0.5,0] first; b vs a': -0.5/0.25 -> b+2a'
      = [0,1], vs c -> [0,0]; c vs b'=[0,0] skipped, vs a': <[0,-1],[0.5,0]> = 0 -> [0,-1]):
      step [0.5,-1]/3 -> theta [7/6, 2/3];
    * projecting each against the original G_b in parallel (non-sequential): a = [0.5,0.5],
      b = [0,0], c = [-0.5,-0.5] -> step [0,0] -> theta [1,1];
    * ignoring the seeded order (e.g. sorted order a:(b,c), b:(a,c), c:(a,b)): c = [-0.5,-0.5]
      -> step [0,-0.5]/3 -> theta [1, 5/6].
    """
    state, updates = three_group_state()
    result = HeteroTune().aggregate(state, updates, round_id=1)
    close(result.state.global_tensors["A"], [7 / 6, 5 / 6])
    tensor = result.diagnostics["tensors"]["A"]
    assert tensor["projections"] == [["a", "b"], ["a", "c"], ["b", "a"], ["b", "c"], ["c", "b"], ["c", "a"]]
    # |[0.5,0]| = 0.5, |[0,0]| = 0, |[0,-0.5]| = 0.5
    assert tensor["projected_norms"] == pytest.approx({"a": 0.5, "b": 0.0, "c": 0.5})
    # cos(a,b) = -1/sqrt2, cos(a,c) = 0, cos(b,c) = -1/sqrt2
    assert tensor["cosines"] == pytest.approx({"a|b": -1 / SQRT2, "a|c": 0.0, "b|c": -1 / SQRT2})
    assert result.diagnostics["orders"] == {"a": ["b", "c"], "b": ["a", "c"], "c": ["b", "a"]}


def test_cmga_three_groups_round3_other_order() -> None:
    """Orders (seed 0, round 3): a: (c,b), b: (a,c), c: (a,b).

    a: vs c: <[1,0],[0,-1]> = 0 -> no; vs b: -1 -> [0.5,0.5]
    b: as in round 1 -> [0,0]  (b's result is order-independent here because a ⊥ c)
    c: vs a: 0 -> no; vs b: -1 -> [-0.5,-0.5]
    step = ([0.5,0.5] + [0,0] + [-0.5,-0.5]) / 3 = [0,0]; theta stays [1,1].
    """
    state, updates = three_group_state()
    result = HeteroTune().aggregate(state, updates, round_id=3)
    close(result.state.global_tensors["A"], [1.0, 1.0])
    assert result.diagnostics["tensors"]["A"]["projections"] == [
        ["a", "b"],
        ["b", "a"],
        ["b", "c"],
        ["c", "b"],
    ]
    # seed=3 with round 0 is the same draw as seed 0 with round 3
    same = HeteroTune(seed=3).aggregate(state, updates, round_id=0)
    close(same.state.global_tensors["A"], [1.0, 1.0])


def test_cmga_skips_zero_norm_group() -> None:
    # G_a = [1,0], G_z = [0,0] (agent returned theta unchanged), G_b = [-1,1]; n = 1 each.
    # Nothing is projected against z; a and b project as in the two-group case:
    # a' = [0.5,0.5], b' = [0,1], z' = [0,0]  (z has no direction, <z, .> = 0: no projection fires)
    # step = ([0.5,0.5] + [0,1] + [0,0]) / 3 = [1/6, 1/2]; theta [0,0] -> [1/6, 1/2]
    state = state_of({"A": a32(0, 0)}, {"a": {}, "b": {}, "z": {}})
    updates = [upd("ka", "a", 1, A=[1, 0]), upd("kb", "b", 1, A=[-1, 1]), upd("kz", "z", 1, A=[0, 0])]
    result = HeteroTune().aggregate(state, updates, round_id=0)
    close(result.state.global_tensors["A"], [1 / 6, 0.5])
    tensor = result.diagnostics["tensors"]["A"]
    assert sorted(tensor["projections"]) == [["a", "b"], ["b", "a"]]
    # cosine with a zero vector is undefined -> None
    assert tensor["cosines"]["a|z"] is None
    assert tensor["cosines"]["b|z"] is None


# --------------------------------------------------------------------------- CMGA reductions


def no_conflict_state() -> tuple[FederatedState, list[ClientUpdate]]:
    """theta = [0,0].

    Group a: a1 (n=1) [2,2], a2 (n=1) [0,2] -> G_a = [1,2]; N_a = 2.
    Group b: b1 (n=6) [3,0]                -> G_b = [3,0]; N_b = 6.
    <G_a,G_b> = 3 >= 0: no conflict.
    """
    state = state_of({"A": a32(0, 0)}, {"a": {}, "b": {}})
    updates = [upd("a1", "a", 1, A=[2, 2]), upd("a2", "a", 1, A=[0, 2]), upd("b1", "b", 6, A=[3, 0])]
    return state, updates


def test_no_conflict_tau1_equals_plain_weighted_mean() -> None:
    state, updates = no_conflict_state()
    # tau=1: w = 2/8, 6/8: step = 1/4*[1,2] + 3/4*[3,0] = [0.25+2.25, 0.5] = [2.5, 0.5]
    # plain weighted mean of all agents: (1*[2,2] + 1*[0,2] + 6*[3,0]) / 8 = [20,4]/8 = [2.5, 0.5]
    cmga = HeteroTune().aggregate(state, updates, round_id=0)
    plain = HeteroTuneNoAlign().aggregate(state, updates, round_id=0)
    close(cmga.state.global_tensors["A"], [2.5, 0.5])
    close(plain.state.global_tensors["A"], [2.5, 0.5])
    assert cmga.diagnostics["tensors"]["A"]["projections"] == []


def test_no_conflict_tau0_equals_group_balanced_fedavg() -> None:
    state, updates = no_conflict_state()
    # tau=0: each group 1/2: 1/2*[1,2] + 1/2*[3,0] = [2, 1]
    out = HeteroTune(tau=0.0).aggregate(state, updates, round_id=0).state
    close(out.global_tensors["A"], [2.0, 1.0])


def test_one_group_equals_fedavg() -> None:
    # theta = [1,1]; g: k1 (n=1) [3,1], k2 (n=3) [-1,5]
    # FedAvg = (1*[3,1] + 3*[-1,5]) / 4 = [0,16]/4 = [0,4]
    # With one group: nothing to project against, w = 1 for any tau, median norm = own norm.
    state = state_of({"A": a32(1, 1)}, {"g": {}})
    updates = [upd("k1", "g", 1, A=[3, 1]), upd("k2", "g", 3, A=[-1, 5])]
    for strategy in (HeteroTune(), HeteroTune(tau=2.0, harmonise_norms=True, seed=5)):
        result = strategy.aggregate(state, updates, round_id=7)
        close(result.state.global_tensors["A"], [0.0, 4.0])
        assert result.diagnostics["tensors"]["A"]["projections"] == []
        assert result.diagnostics["tensors"]["A"]["cosines"] == {}


# --------------------------------------------------------------------------- norm harmonisation


def test_harmonise_norms_to_median_skipping_zero() -> None:
    # theta [0,0]; n = 1 each; G_a=[1,0], G_b=[0,2], G_c=[4,0], G_d=[0,0].
    # dots: ab 0, ac 4, bc 0, d zero -> no projection.
    # non-zero norms 1, 2, 4 -> median 2 (d excluded).
    # scaled: a [2,0] (x2), b [0,2] (x1), c [2,0] (x0.5), d [0,0]
    # step = ([2,0] + [0,2] + [2,0] + [0,0]) / 4 = [1, 0.5]
    # (without harmonisation: [5,2]/4 = [1.25, 0.5])
    state = state_of({"A": a32(0, 0)}, {"a": {}, "b": {}, "c": {}, "d": {}})
    updates = [
        upd("ka", "a", 1, A=[1, 0]),
        upd("kb", "b", 1, A=[0, 2]),
        upd("kc", "c", 1, A=[4, 0]),
        upd("kd", "d", 1, A=[0, 0]),
    ]
    result = HeteroTune(harmonise_norms=True).aggregate(state, updates, round_id=0)
    close(result.state.global_tensors["A"], [1.0, 0.5])
    assert result.diagnostics["tensors"]["A"]["scales"] == pytest.approx(
        {"a": 2.0, "b": 1.0, "c": 0.5, "d": 1.0}
    )
    plain = HeteroTune().aggregate(state, updates, round_id=0)
    close(plain.state.global_tensors["A"], [1.25, 0.5])


def test_harmonise_uses_projected_norms() -> None:
    # theta [0,0]; n = 1 each; G_a = [2,0], G_b = [-1,1], G_c = [0,3].
    # dots: ab = -2 (conflict), ac = 0, bc = 3. Order-independent here (c conflicts with nobody,
    # and after a's projection <a',c> = <[1,1],[0,3]> = 3 > 0, after b's <b',c> = 3 > 0).
    # a' = [2,0] - (-2/2)[-1,1] = [1,1]      |a'| = sqrt2
    # b' = [-1,1] - (-2/4)[2,0] = [0,1]      |b'| = 1
    # c' = [0,3]                              |c'| = 3
    # median of projected norms = sqrt2 (of the original norms 2, sqrt2, 3 it would be 2)
    # scaled: a [1,1], b [0,sqrt2], c [0,sqrt2]; step = [1, 1 + 2 sqrt2]/3 = [0.33333333, 1.27614237]
    state = state_of({"A": a32(0, 0)}, {"a": {}, "b": {}, "c": {}})
    updates = [upd("ka", "a", 1, A=[2, 0]), upd("kb", "b", 1, A=[-1, 1]), upd("kc", "c", 1, A=[0, 3])]
    for round_id in (0, 1, 3):
        out = HeteroTune(harmonise_norms=True).aggregate(state, updates, round_id=round_id).state
        close(out.global_tensors["A"], [0.33333333, 1.27614237])


# --------------------------------------------------------------------------- noalign


def test_noalign_is_plain_weighted_mean_over_all_agents() -> None:
    state, updates = two_group_conflict()
    state.group_tensors["a"] = {"W": a32(0)}
    state.group_tensors["b"] = {"W": a32(0)}
    updates = [
        ClientUpdate(u.agent_id, u.group, u.num_samples, {**u.tensors, "W": a32(w)})
        for u, w in zip(updates, [2.0, 6.0, 10.0], strict=True)
    ]
    result = HeteroTuneNoAlign().aggregate(state, updates, round_id=0)
    # global: (1*[5,1] + 3*[1,1] + 2*[0,2]) / 6 = [8,8]/6 = [4/3, 4/3]  (no projection)
    close(result.state.global_tensors["A"], [4 / 3, 4 / 3])
    # group a: (1*2 + 3*6)/4 = 20/4 = 5; group b: 10
    close(result.state.group_tensors["a"]["W"], [5.0])
    close(result.state.group_tensors["b"]["W"], [10.0])
    # diagnostic only: same cosine as heterotune would report, -1/sqrt2
    assert result.diagnostics["tensors"]["A"]["cosines"] == {"a|b": pytest.approx(-1 / SQRT2)}


# --------------------------------------------------------------------------- group-fedavg


def test_group_fedavg_keeps_groups_separate() -> None:
    # Same tensor name, different widths per backbone: averaged only within each group.
    # g1: (1*[1,1] + 1*[3,3]) / 2 = [2,2];  g2: only k3 -> [7,8,9]
    state = state_of({}, {"g1": {"w_out": a32(0, 0)}, "g2": {"w_out": a32(0, 0, 0)}})
    updates = [
        upd("k1", "g1", 1, w_out=[1, 1]),
        upd("k2", "g1", 1, w_out=[3, 3]),
        upd("k3", "g2", 5, w_out=[7, 8, 9]),
    ]
    out = GroupFedAvg().aggregate(state, updates, round_id=0).state
    close(out.group_tensors["g1"]["w_out"], [2.0, 2.0])
    close(out.group_tensors["g2"]["w_out"], [7.0, 8.0, 9.0])
    assert out.global_tensors == {}


def test_group_fedavg_rejects_global_tensors() -> None:
    state = state_of({"A": a32(0, 0)}, {"g": {}})
    with pytest.raises(ValueError, match=r"group-fedavg expects no global-scope tensors.*scope as group"):
        GroupFedAvg().aggregate(state, [upd("k", "g", 1, A=[1, 1])], round_id=0)


# --------------------------------------------------------------------------- local


def test_local_returns_unchanged_copy() -> None:
    state = state_of({"A": a32(1, 2)}, {"g": {"w": a32(3)}})
    result = LocalOnly().aggregate(state, [upd("k", "g", 4)], round_id=0)
    close(result.state.global_tensors["A"], [1.0, 2.0])
    close(result.state.group_tensors["g"]["w"], [3.0])
    assert result.state.global_tensors["A"] is not state.global_tensors["A"]
    assert not np.shares_memory(result.state.group_tensors["g"]["w"], state.group_tensors["g"]["w"])
    assert result.diagnostics["num_updates"] == 1


def test_local_rejects_uploaded_tensors() -> None:
    state = state_of({}, {"g": {}})
    with pytest.raises(ValueError, match="agents upload nothing"):
        LocalOnly().aggregate(state, [upd("k", "g", 1, head=[1.0])], round_id=0)


# --------------------------------------------------------------------------- purity


@pytest.mark.parametrize("name", ["heterotune", "heterotune-noalign"])
def test_inputs_not_mutated_and_outputs_not_aliased(name: str) -> None:
    state, updates = two_group_conflict()
    state.group_tensors["a"] = {"W": a32(1)}
    state.group_tensors["b"] = {"W": a32(2)}
    state.group_tensors["idle"] = {"W": a32(3)}
    updates = [ClientUpdate(u.agent_id, u.group, u.num_samples, {**u.tensors, "W": a32(5)}) for u in updates]
    state_before = copy.deepcopy(state)
    updates_before = copy.deepcopy(updates)
    result = make_strategy(name, harmonise_norms=True) if name == "heterotune" else make_strategy(name)
    out = result.aggregate(state, updates, round_id=2).state

    for key, value in state_before.global_tensors.items():
        np.testing.assert_array_equal(state.global_tensors[key], value)
    for group, tensors in state_before.group_tensors.items():
        for key, value in tensors.items():
            np.testing.assert_array_equal(state.group_tensors[group][key], value)
    for before, after in zip(updates_before, updates, strict=True):
        for key, value in before.tensors.items():
            np.testing.assert_array_equal(after.tensors[key], value)
    # the idle group's tensor is a copy, not the caller's array
    close(out.group_tensors["idle"]["W"], [3.0])
    assert not np.shares_memory(out.group_tensors["idle"]["W"], state.group_tensors["idle"]["W"])
    for u in updates:
        for arr in u.tensors.values():
            assert not any(np.shares_memory(arr, o) for o in out.global_tensors.values())


def test_no_updates_keeps_state() -> None:
    state, _ = two_group_conflict()
    for name in ("heterotune", "heterotune-noalign"):
        out = make_strategy(name).aggregate(state, [], round_id=0).state
        close(out.global_tensors["A"], [1.0, 1.0])
        assert out.global_tensors["A"] is not state.global_tensors["A"]


def test_idle_group_does_not_move_global_but_keeps_group_tensors() -> None:
    # group c is in the state but sent nothing: the global step uses only a and b (as in the
    # two-group case -> [4/3, 5/3]); c's group tensor is unchanged.
    state, updates = two_group_conflict()
    state.group_tensors["c"] = {}
    result = HeteroTune().aggregate(state, updates, round_id=0)
    close(result.state.global_tensors["A"], [4 / 3, 5 / 3])
    assert set(result.diagnostics["group_weights"]) == {"a", "b"}


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["heterotune", "heterotune-noalign", "group-fedavg"])
@pytest.mark.parametrize(
    ("update", "message"),
    [
        (upd("k", "g", 1), r"lacks tensors \['w'\]"),
        (upd("k", "g", 0, w=[1, 2]), r"num_samples=0; must be > 0"),
        (upd("k", "g", -3, w=[1, 2]), r"num_samples=-3"),
        (upd("k", "g", 1, w=[1, 2, 3]), r"tensor 'w' has shape \(3,\), expected \(2,\)"),
        (upd("k", "other", 1, w=[1, 2]), r"group 'other', which the state does not know"),
        (upd("k", "g", 1, w=[1, 2], head=[1]), r"unexpected tensors \['head'\]"),
    ],
)
def test_validation_errors(name: str, update: ClientUpdate, message: str) -> None:
    state = state_of({}, {"g": {"w": a32(0, 0)}})
    with pytest.raises(ValueError, match=message):
        make_strategy(name).aggregate(state, [update], round_id=0)


def test_validation_global_tensor_missing_and_duplicate_agent() -> None:
    state = state_of({"A": a32(0, 0)}, {"g": {}})
    with pytest.raises(ValueError, match=r"lacks tensors \['A'\]"):
        HeteroTune().aggregate(state, [upd("k", "g", 1)], round_id=0)
    twice = [upd("k", "g", 1, A=[1, 1]), upd("k", "g", 1, A=[1, 1])]
    with pytest.raises(ValueError, match="more than one update"):
        HeteroTune().aggregate(state, twice, round_id=0)


def test_validation_name_in_both_scopes() -> None:
    state = state_of({"A": a32(0, 0)}, {"g": {"A": a32(0, 0)}})
    with pytest.raises(ValueError, match="both global scope and group scope"):
        HeteroTuneNoAlign().aggregate(state, [], round_id=0)


# --------------------------------------------------------------------------- registry


def test_registry_builds_every_strategy() -> None:
    assert set(STRATEGY_NAMES) == {"heterotune", "heterotune-noalign", "group-fedavg", "local", "fedproto"}
    for name in STRATEGY_NAMES:
        assert make_strategy(name).name == name
    strategy = make_strategy("heterotune", tau=0.5, eta_s=2.0, seed=3, harmonise_norms=True)
    assert isinstance(strategy, HeteroTune)
    assert (strategy.tau, strategy.eta_s, strategy.seed, strategy.harmonise_norms) == (0.5, 2.0, 3, True)


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown aggregation strategy 'fedavg'; valid names: heterotune, "):
        make_strategy("fedavg")
    with pytest.raises(ValueError, match=r"no option\(s\) \['tua'\].*'tau'"):
        make_strategy("heterotune", tua=0.0)
    with pytest.raises(ValueError, match=r"no option\(s\) \['tau'\]; valid options: none"):
        make_strategy("group-fedavg", tau=1.0)
    with pytest.raises(ValueError, match="eta_s must be finite and > 0"):
        make_strategy("heterotune", eta_s=0.0)


# --------------------------------------------------------------------------- fedproto


def named(tensors: dict[str, npt.ArrayLike]) -> dict[str, npt.ArrayLike]:
    """Typed identity, so prototype names with dots can be passed as keyword tensors."""
    return tensors


def proto_state() -> FederatedState:
    return state_of(
        {
            "proto.neg": a32(0, 0),
            "proto_count.neg": np.array(0.0, dtype=np.float32),
            "proto.pos": a32(1, 1),
            "proto_count.pos": np.array(5.0, dtype=np.float32),
            "proto.neu": a32(9, 9),
            "proto_count.neu": np.array(4.0, dtype=np.float32),
        },
        {"g1": {}, "g2": {}},
    )


def test_fedproto_count_weighted_prototypes() -> None:
    updates = [
        upd(
            "k1",
            "g1",
            10,
            **named(
                {"proto.neg": [1, 2], "proto_count.neg": 1.0, "proto.pos": [3, 0], "proto_count.pos": 3.0}
            ),
        ),
        # k2 sends pos with count 0 (= not seen) and never sends neu
        upd(
            "k2",
            "g2",
            20,
            **named(
                {"proto.neg": [4, 8], "proto_count.neg": 3.0, "proto.pos": [0, 0], "proto_count.pos": 0.0}
            ),
        ),
    ]
    result = FedProto().aggregate(proto_state(), updates, round_id=0)
    g = result.state.global_tensors
    # neg: (1*[1,2] + 3*[4,8]) / 4 = [13,26]/4 = [3.25, 6.5]; count 1 + 3 = 4
    close(g["proto.neg"], [3.25, 6.5])
    close(g["proto_count.neg"], 4.0)
    # pos: only k1 (k2's count is 0): [3,0]; count 3 (num_samples plays no role)
    close(g["proto.pos"], [3.0, 0.0])
    close(g["proto_count.pos"], 3.0)
    # neu: nobody saw it -> previous [9,9], count 4
    close(g["proto.neu"], [9.0, 9.0])
    close(g["proto_count.neu"], 4.0)
    assert result.diagnostics["unseen_classes"] == ["neu"]
    assert result.diagnostics["classes"]["neg"] == {"agents": 2, "count": 4.0}


def test_fedproto_validation() -> None:
    with pytest.raises(ValueError, match="needs both"):
        FedProto().aggregate(proto_state(), [upd("k", "g1", 1, **named({"proto.neg": [1, 1]}))], round_id=0)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        FedProto().aggregate(
            proto_state(),
            [upd("k", "g1", 1, **named({"proto.neg": [1, 1], "proto_count.neg": -1.0}))],
            round_id=0,
        )
    with pytest.raises(ValueError, match=r"has shape \(3,\), expected \(2,\)"):
        FedProto().aggregate(
            proto_state(),
            [upd("k", "g1", 1, **named({"proto.neg": [1, 1, 1], "proto_count.neg": 1.0}))],
            round_id=0,
        )
    bad = proto_state()
    bad.global_tensors["W_g"] = a32(0, 0)
    with pytest.raises(ValueError, match="'W_g' is not a prototype"):
        FedProto().aggregate(bad, [], round_id=0)
