"""bench/peers.py's arithmetic, pinned on hand-computed numbers: what a wrong overhead, weighting or goal test
would change on docs/peers.md."""

from __future__ import annotations

from typing import Any

import pytest

from bench.peers import _final, _flower_kind, _flower_row, _round_entry
from bench.peers_report import goal_rows


def _agent(train: float, evaluate: float, up: int, down: int) -> dict[str, Any]:
    return {"train_seconds": train, "eval_seconds": evaluate, "bytes_up": up, "bytes_down": down}


def test_round_overhead_is_wall_minus_the_slowest_devices_train_plus_eval() -> None:
    # Slowest by train + eval is the second (4 + 3 = 7), not the one with the longest training (6 + 0.5).
    entry = _round_entry(1, 100.0, 110.0, [_agent(6.0, 0.5, 10, 20), _agent(4.0, 3.0, 30, 40)])
    assert entry["wall_s"] == pytest.approx(10.0)
    assert entry["slowest_compute_s"] == pytest.approx(7.0)
    assert entry["overhead_s"] == pytest.approx(3.0)
    assert (entry["bytes"], entry["bytes_up"], entry["bytes_down"]) == (100, 40, 60)


def test_final_accuracy_is_weighted_by_each_devices_test_size() -> None:
    rows = [{"personal_accuracy": 1.0, "n_test": 30, "global_accuracy": 0.5, "n_global_test": 300},
            {"personal_accuracy": 0.5, "n_test": 10, "global_accuracy": 0.7, "n_global_test": 100}]
    final = _final(rows)
    assert final["personal_accuracy"] == pytest.approx((30 * 1.0 + 10 * 0.5) / 40)  # 0.875, not the mean 0.75
    assert final["global_accuracy"] == pytest.approx((300 * 0.5 + 100 * 0.7) / 400)


def test_a_flower_reply_becomes_accuracies_in_the_product_units() -> None:
    row = _flower_row({"personal_correct": 3, "personal_total": 4, "global_correct": 0, "global_total": 0})
    assert row["personal_accuracy"] == pytest.approx(0.75)
    assert row["global_accuracy"] is None and row["n_test"] == 4


def test_flower_processes_are_told_apart_by_command_line() -> None:
    assert _flower_kind("/v/bin/python /v/bin/flwr-clientapp --insecure") == "clientapp"
    assert _flower_kind("/v/bin/python /v/bin/flower-supernode --insecure") == "supernode"
    assert _flower_kind("/usr/bin/mosquitto -c x") == "other"


def _run(overheads: list[float], peak: float, personal: float, global_: float) -> dict[str, Any]:
    return {"rounds": [{"round": i + 1, "overhead_s": o} for i, o in enumerate(overheads)],
            "device_peak_vmhwm": {"minilm-l3": peak},
            "final": {"personal_accuracy": personal, "global_accuracy": global_}}


def test_goals_use_steady_rounds_and_say_met_or_missed() -> None:
    ours = _run([50.0, 1.0, 3.0], 300.0, 0.80, 0.70)  # steady median 2.0 s; round 1's start-up is left out
    peer = _run([90.0, 30.0, 50.0], 400.0, 0.795, 0.685)  # steady median 40 s
    rows = {r[0]: r for r in goal_rows({"heterotune": ours, "flower-deployment": peer})}
    overhead = next(r for k, r in rows.items() if k.startswith("round overhead"))
    assert overhead[2] == "20.0x" and overhead[3] == "met"
    rss = next(r for k, r in rows.items() if k.startswith("device peak RSS"))
    assert rss[2].startswith("0.75x") and rss[3] == "missed"
    accuracy = {k: r for k, r in rows.items() if "accuracy" in k}
    assert [r[2] for r in accuracy.values()] == ["+0.5 points", "+1.5 points"]
    assert [r[3] for r in accuracy.values()] == ["met", "missed"]
