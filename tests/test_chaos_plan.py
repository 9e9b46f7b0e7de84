"""The chaos soak's schedule (bench/chaos_plan.py): reproducible from its seed, calm at the end, one broker
restart, and never two faults on the same agent in one round."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.chaos_plan import KINDS, chaos_plan


def test_the_same_seed_gives_the_same_plan_and_another_seed_another() -> None:
    assert chaos_plan(30, 7) == chaos_plan(30, 7)
    assert chaos_plan(30, 7) != chaos_plan(30, 8)


def test_the_last_rounds_are_calm_and_the_broker_restarts_once_mid_run() -> None:
    plan = chaos_plan(30, 7, calm_rounds=2)
    assert max(f.round_id for f in plan) <= 28
    assert [f.round_id for f in plan if f.kind == "broker_restart"] == [15]
    assert {f.kind for f in plan} == {*KINDS, "broker_restart"}
    assert not [f for f in chaos_plan(30, 7, broker_round=0) if f.kind == "broker_restart"]


def test_faults_of_one_round_pick_distinct_agents_and_stay_in_bounds() -> None:
    for seed in range(20):
        plan = chaos_plan(30, seed)
        per_round = Counter((f.round_id, f.pick) for f in plan if f.kind != "broker_restart")
        assert max(per_round.values()) == 1, f"seed {seed}: two faults on one agent in one round"
        for fault in plan:
            assert 0.5 <= fault.offset_s <= 4.0 and fault.duration_s >= 0
            assert fault.kind != "stall" or fault.duration_s in (4.0, 16.0, 24.0)


def test_too_few_rounds_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        chaos_plan(0, 1)
    assert chaos_plan(2, 1) == []  # both rounds calm: nothing to do, and no broker restart in a calm round
