"""The chaos soak's "nothing accepted lost" check (bench/chaos_report.py) on a hand-made run directory: it passes
when the committed tensors are the weighted mean of exactly the accepted updates, and fails when an accepted
update is missing from the aggregate, when the store and the observed events disagree, or when a round is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.chaos_report import BACKBONE, check_accepted, check_rounds
from coordinator.aggregation import FederatedState
from coordinator.store import MetricRow, RunStore

UPDATES = {"a": (np.array([1.0, 2.0], np.float32), 1), "b": (np.array([4.0, 8.0], np.float32), 3)}


def _row(agent: str, n_train: int) -> MetricRow:
    return MetricRow(round=1, agent_id=agent, backbone=BACKBONE, personal_accuracy=0.5, global_accuracy=0.5,
                     n_test=10, n_global_test=10, n_train=n_train, train_loss=1.0, bytes_up=1, bytes_down=1,
                     train_seconds=1.0, eval_seconds=1.0, peak_rss_mb=1.0, backend="ort", accepted=True)


def _run(tmp: Path, committed: np.ndarray) -> Path:
    store = RunStore(tmp)
    zero = {"w": np.zeros(2, np.float32)}
    store.save_state(0, FederatedState(global_tensors=dict(zero), group_tensors={BACKBONE: {"g": zero["w"]}}))
    for agent, (value, _) in UPDATES.items():
        store.save_update(1, agent, {"w": value, "g": value})
    store.commit_round(1, FederatedState(global_tensors={"w": committed}, group_tensors={BACKBONE: {"g": committed}}),
                       started=0.0, selected=2, metrics=[_row(a, n) for a, (_, n) in UPDATES.items()], diagnostics={})
    store.close()
    return tmp


def _result(accepted: list[str], rounds: int = 1) -> dict[str, Any]:
    events = [{"event": "round_started", "round_id": 1, "attempt": 0, "needed": 1},
              *[{"event": "update_handled", "round_id": 1, "attempt": 0, "agent_id": a, "outcome": "accepted",
                 "reason": ""} for a in accepted],
              {"event": "round_ended", "round_id": 1, "attempt": 0, "committed": True}]
    return {"config": {"rounds": rounds}, "summary": {}, "error": "", "events": events}


def test_a_round_that_is_the_weighted_mean_of_its_accepted_updates_passes(tmp_path: Path) -> None:
    run = _run(tmp_path, np.array([3.25, 6.5], np.float32))  # (1*[1,2] + 3*[4,8]) / 4, by hand
    rounds_ok, problems, attempts = check_rounds(_result(["a", "b"]), run)
    assert rounds_ok, problems
    ok, problems, counts = check_accepted(_result(["a", "b"]), run, attempts)
    assert ok, problems
    assert counts == {"accepted and committed": 2, "rounds recomputed": 1}


def test_an_accepted_update_left_out_of_the_aggregate_is_caught(tmp_path: Path) -> None:
    run = _run(tmp_path, np.array([4.0, 8.0], np.float32))  # only b's update: a's was accepted and lost
    ok, problems, _ = check_accepted(_result(["a", "b"]), run, {1: [True]})
    assert not ok and any("differs from the mean" in p for p in problems)


def test_an_accepted_event_missing_from_the_store_is_caught(tmp_path: Path) -> None:
    run = _run(tmp_path, np.array([3.25, 6.5], np.float32))
    ok, problems, _ = check_accepted(_result(["a"]), run, {1: [True]})
    assert not ok and "accepted events ['a'] != stored ['a', 'b']" in problems[0]


def test_a_round_never_committed_is_caught(tmp_path: Path) -> None:
    run = _run(tmp_path, np.array([3.25, 6.5], np.float32))
    ok, problems, _ = check_rounds(_result(["a", "b"], rounds=2), run)
    assert not ok and any("round 2" in p for p in problems)
