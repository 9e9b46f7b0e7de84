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
    # The final aggregate, measured by every agent after the last round (global view and each device's own model).
    final = summary["final"]
    assert isinstance(final, dict) and set(final["agents"]) == {agent for agent, _ in DEMO_FLEET}
    print(json.dumps({k: final[k] for k in ("global_accuracy", "personal_accuracy")}))
    assert final["global_accuracy"] >= first["global_accuracy"] + 0.05, (first, final)


def test_agent_memory_stays_flat_and_matches_the_cost_card(demo_run: tuple[Path, dict[str, object]]) -> None:
    # Before agents fixed glibc's mmap threshold (edge_agent/allocator.py), a MiniLM-L6 agent peaked ~35 MB higher
    # from round 2 on (407 -> 442 MB), above its card; and a card is only useful if it predicts the agent.
    import csv

    from coordinator.demo import demo_config
    from coordinator.runner import build_bundles

    out, summary = demo_run
    cards = {name: b.manifest.cost_card for name, b in build_bundles(demo_config()).items()}
    peaks: dict[str, list[float]] = {}
    with (out / "metrics.csv").open() as handle:
        for row in sorted(csv.DictReader(handle), key=lambda r: int(r["round"])):
            peaks.setdefault(row["agent_id"], []).append(float(row["peak_rss_mb"]))
    agents = summary["agents"]
    assert isinstance(agents, dict)
    for agent_id, per_round in peaks.items():
        card = cards[agents[agent_id]]
        assert card is not None
        print(f"{agent_id}: card {card.peak_train_rss_mb:.0f} MB, peaks " + " / ".join(f"{p:.0f}" for p in per_round))
        assert max(per_round[1:]) <= 1.03 * per_round[0], (agent_id, per_round)
        assert 0.9 <= card.peak_train_rss_mb / max(per_round) <= 1.1, (agent_id, card.peak_train_rss_mb, per_round)
