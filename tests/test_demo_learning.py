"""Learning on real weights and real data: the README's demo, run as-is, gets measurably better.

Real MiniLM-L3/L6 weights, real tweets (Dirichlet 0.3 label skew), real ORT training in four agent processes,
a real mosquitto. Accuracies of every round are printed so a CI log shows the whole curve.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.demo import DEMO_FLEET, run_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out)


def test_devices_get_the_largest_backbone_that_fits(demo_run: tuple[Path, dict[str, object]]) -> None:
    _, summary = demo_run
    expected = {agent: ("minilm-l3" if cap < 1000 else "minilm-l6") for agent, cap in DEMO_FLEET}
    assert summary["agents"] == expected
    assert summary["refused"] == {}


def test_global_accuracy_rises_and_both_views_are_reported(demo_run: tuple[Path, dict[str, object]]) -> None:
    out, summary = demo_run
    per_round = summary["per_round"]
    assert isinstance(per_round, list)
    print(json.dumps([{k: r[k] for k in ("round", "global_accuracy", "personal_accuracy")} for r in per_round]))
    assert [r["round"] for r in per_round] == [1, 2, 3, 4, 5]
    first, last = per_round[0], per_round[-1]
    assert all(r["accepted"] == len(DEMO_FLEET) for r in per_round)
    # Round 1's "global" model is the untrained start (W_out = 0, initial head): chance level on 3 classes.
    assert last["global_accuracy"] >= first["global_accuracy"] + 0.05, (first, last)
    assert all(r["personal_accuracy"] is not None for r in per_round)
    csv_rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 5 * len(DEMO_FLEET)
