"""`coordinator assign --explain`: the arithmetic for a fleet, and that a real emulated fleet gets exactly that.

1. `plan_fleet` on hand-computed cards (speed, own round limits, pins, refusals);
2. the CLI on real tiny bundles agrees with `assign_backbone` computed here from the bundles' cost cards;
3. a real mixed fleet (tiny-3 and the real MiniLM-L3, plus a device too small for either) through a real
   mosquitto: every agent gets what `assign --explain` said, none exceeds its memory cap, the small device
   is refused at join with what it would need while the run goes on, and the cost cards' peak RSS is within
   +-20 % of what the real agent processes reached.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from coordinator.assignment import CostCard, DeviceBudget, assign_backbone
from coordinator.cli import app
from coordinator.config import RunConfig, load_config
from coordinator.fleet import EmulatedAgent, format_plan, load_fleet, plan_fleet
from coordinator.runner import build_bundles
from coordinator.store import RunStore


def card(name: str, layers: int, mb: float, step: float, eval_s: float) -> CostCard:
    return CostCard(backbone=name, peak_train_rss_mb=mb, step_seconds=step, eval_seconds_per_sample=eval_s,
                    flops_per_step=1e9, payload_bytes=1, bundle_bytes=1, builder_gflops=100.0, layers=layers,
                    hidden=384)


# Builder at 100 GFLOP/s; 15 local steps and 50 eval samples: minilm-l3 2 s per round, minilm-l6 4 s.
CARDS = [card("minilm-l3", 3, 200.0, 0.1, 0.01), card("minilm-l6", 6, 300.0, 0.2, 0.02)]
CONFIG = RunConfig(backbones=("minilm-l3", "minilm-l6"), local_steps=15, round_timeout_s=30, memory_fraction=0.8,
                   pinned={"pinned-1": "minilm-l3"})


def test_plan_fleet_on_hand_computed_cards() -> None:
    agents = [
        EmulatedAgent("big-1", 1000, 1.0, None, "big"),        # l6: 300 <= 800 MB, 4 s <= 30 s
        EmulatedAgent("slow-1", 1000, 10.0, None, "slow"),     # 10 GFLOP/s: l6 40 s > 30; l3 20 s
        EmulatedAgent("tight-1", 374, 1.0, None, "tight"),     # 0.8 x 374 = 299.2 < 300: l3
        EmulatedAgent("hurried-1", 1000, 1.0, 3.0, "hurried"),  # own limit 3 s: l6 4 s too slow; l3 2 s
        EmulatedAgent("pinned-1", 1000, 1.0, None, "pinned"),  # pinned to l3 although l6 fits
        EmulatedAgent("snail-1", 1000, 20.0, None, "snail"),   # 5 GFLOP/s: l3 40 s > 30 -> refused
    ]
    plans = plan_fleet(agents, CARDS, CONFIG, eval_samples=50)
    assert [p.decision.backbone for p in plans] == ["minilm-l6", "minilm-l3", "minilm-l3", "minilm-l3",
                                                     "minilm-l3", None]
    assert [p.device.gflops for p in plans] == [100.0, 10.0, 100.0, 100.0, 100.0, 5.0]
    assert "x 100 / 10 GFLOP/s = 40.0 s vs limit 30.0 s -> too slow" in plans[1].decision.lines[0]
    # snail: 5 GFLOP/s x 40 s / 30 s = 6.7 GFLOP/s would do
    assert plans[5].decision.reason.endswith("it would take at least 6.7 GFLOP/s (device has 5)")
    text = format_plan(plans, CARDS, CONFIG, source="test", explain=True)
    assert "slow x1 (slow-1): memory budget 1,000 MB, 10.0 GFLOP/s (speed 0.1 x the builder)" in text
    assert "hurried x1 (hurried-1): memory budget 1,000 MB, 100.0 GFLOP/s (speed 1 x the builder), own round " \
           "limit 3 s" in text
    assert ", pinned to minilm-l3" in text
    for p in plans:
        assert all(line in text for line in p.decision.lines)
    assert decisions_of(text) == {p.agent.agent_id: p.decision.backbone for p in plans}


def decisions_of(text: str) -> dict[str, str | None]:
    """The 'decisions:' block of the CLI output: agent id -> backbone (None = refused)."""
    block = text.split("decisions:\n", 1)[1] if "decisions:\n" in text else text.split("\n", 1)[1]
    pairs = [line.split() for line in block.splitlines() if line.startswith("  ")]
    return {agent: (None if outcome == "refused" else outcome) for agent, outcome in pairs}


TINY_CONFIG = """
run_name = "explain"
backbones = ["tiny-3", "tiny-6"]
local_steps = 3
round_timeout_s = 120
[task]
max_length = 32
batch_size = 8
"""

TINY_FLEET = """
name = "tiny"
[data]
samples_per_agent = 100
global_test_per_class = 10
[classes.roomy]
memory_mb = 2000
[classes.crowded]
memory_mb = 60
[classes.sluggish]
count = 2
memory_mb = 1000
speed = 0.5
max_round_seconds = 60
"""


def test_cli_explain_agrees_with_assign_backbone_on_the_real_cards(tmp_path: Path) -> None:
    config_file, fleet_file = tmp_path / "run.toml", tmp_path / "fleet.toml"
    config_file.write_text(TINY_CONFIG)
    fleet_file.write_text(TINY_FLEET)
    runner = CliRunner()
    explained = runner.invoke(app, ["assign", "--explain", "--fleet", str(fleet_file), "--config", str(config_file)])
    assert explained.exit_code == 0, explained.output
    as_json = runner.invoke(app, ["assign", "--json", "--fleet", str(fleet_file), "--config", str(config_file)])
    assert as_json.exit_code == 0, as_json.output

    # Independently: the bundles' cards, the fleet's nominal devices, the pure policy.
    config = load_config(config_file)
    manifests = [b.manifest for b in build_bundles(config).values()]
    cards = [CostCard(backbone=m.backbone, peak_train_rss_mb=m.cost_card.peak_train_rss_mb,  # type: ignore[union-attr]
                      step_seconds=m.cost_card.step_seconds,  # type: ignore[union-attr]
                      eval_seconds_per_sample=m.cost_card.eval_seconds_per_sample,  # type: ignore[union-attr]
                      flops_per_step=0.0, payload_bytes=0, bundle_bytes=0,
                      builder_gflops=m.cost_card.builder_gflops,  # type: ignore[union-attr]
                      layers=m.layers, hidden=m.hidden) for m in manifests]
    base = statistics.median(c.builder_gflops for c in cards)
    devices = {"roomy-1": (2000, 1.0, None), "crowded-1": (60, 1.0, None), "sluggish-1": (1000, 0.5, 60.0),
               "sluggish-2": (1000, 0.5, 60.0)}
    eval_samples = 100 // 4 + 10 * 3
    expected = {}
    for agent_id, (memory, speed, limit) in devices.items():
        decision = assign_backbone(DeviceBudget(agent_id, memory, base * speed, limit), cards, local_steps=3,
                                   eval_samples=eval_samples, memory_fraction=config.memory_fraction,
                                   deadline_seconds=120)
        expected[agent_id] = decision
        assert all(line in explained.output for line in decision.lines), decision.lines
        assert f"=> {decision.reason}" in explained.output
    assert decisions_of(explained.output) == {a: d.backbone for a, d in expected.items()}
    assert expected["crowded-1"].backbone is None  # 60 MB is below anything a real process needs
    rows = json.loads(as_json.output[as_json.output.index("["):])
    assert {r["agent_id"]: r["backbone"] for r in rows} == {a: d.backbone for a, d in expected.items()}
    assert {r["agent_id"]: r["eval_samples"] for r in rows} == dict.fromkeys(devices, eval_samples)


def test_cli_reports_invalid_fleet_files(tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text("[classes.pi]\nspeed = 3\n")
    result = CliRunner().invoke(app, ["assign", "--fleet", str(fleet_file)])
    assert result.exit_code == 2
    assert "classes.pi.memory_mb: required field is missing" in result.output
    assert "classes.pi.speed: speed must be <= 1" in result.output


# ------------------------------------------------------------------------------- a real mixed fleet

MIXED_CONFIG = """
run_name = "mixed"
backbones = ["tiny-3", "minilm-l3"]
rounds = 2
local_steps = 2
learning_rate = 0.002
join_timeout_s = 240
round_timeout_s = 300
"""

# Cards on the builder (probe v2): tiny-3 ~131 MB, minilm-l3 ~312 MB. 0.9 x 250 = 225 MB admits only tiny-3,
# 0.9 x 1000 = 900 MB admits minilm-l3, 0.9 x 64 = 58 MB nothing.
MIXED_FLEET = """
name = "mixed-test"
[data]
samples_per_agent = 40
global_test_per_class = 4
[classes.small]
memory_mb = 250
[classes.large]
memory_mb = 1000
speed = 0.5
[classes.too-small]
memory_mb = 64
"""


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from coordinator.demo import plan_for, run_fleet

    tmp = tmp_path_factory.mktemp("mixed")
    (tmp / "run.toml").write_text(MIXED_CONFIG)
    (tmp / "fleet.toml").write_text(MIXED_FLEET)
    explained = CliRunner().invoke(app, ["assign", "--json", "--fleet", str(tmp / "fleet.toml"), "--config",
                                         str(tmp / "run.toml")])
    assert explained.exit_code == 0, explained.output
    fleet = load_fleet(tmp / "fleet.toml")
    config, _plans = plan_for(fleet.agents(), load_config(tmp / "run.toml"), fleet.data)
    summary = run_fleet(tmp / "out", fleet.agents(), config, fleet.data, seed=2)
    store = RunStore(tmp / "out")
    try:
        rows = store.metrics()
    finally:
        store.close()
    return {"summary": summary, "rows": rows, "min_agents": config.min_agents, "out": tmp / "out",
            "explained": json.loads(explained.stdout),
            "caps": {a.agent_id: a.memory_mb for a in fleet.agents()},
            "cards": {name: b.manifest.cost_card for name, b in build_bundles(config).items()}}


@pytest.mark.slow
def test_each_agent_gets_what_assign_explain_said(mixed_run: dict[str, Any]) -> None:
    summary, explained = mixed_run["summary"], mixed_run["explained"]
    assert {r["agent_id"]: r["backbone"] for r in explained} == {
        "small-1": "tiny-3", "large-1": "minilm-l3", "too-small-1": None}
    assert summary["agents"] == {r["agent_id"]: r["backbone"] for r in explained if r["backbone"]}
    assert set(summary["refused"]) == {r["agent_id"] for r in explained if r["backbone"] is None}
    assert mixed_run["min_agents"] == 2  # the demo waited for exactly the admitted agents


@pytest.mark.slow
def test_no_agent_exceeds_its_memory_cap(mixed_run: dict[str, Any]) -> None:
    rows, caps = mixed_run["rows"], mixed_run["caps"]
    assert {(r.round, r.agent_id) for r in rows} == {(n, a) for n in (1, 2) for a in ("small-1", "large-1")}
    for row in rows:
        assert row.accepted, row
        assert 0 < row.peak_rss_mb <= caps[row.agent_id], (row.agent_id, row.peak_rss_mb)
    for agent_id in ("small-1", "large-1"):
        log = (mixed_run["out"] / "agents" / f"{agent_id}.log").read_text()
        assert "memory cap exceeded" not in log, log[-2000:]


@pytest.mark.slow
def test_too_small_device_is_refused_at_join_and_the_run_goes_on(mixed_run: dict[str, Any]) -> None:
    summary = mixed_run["summary"]
    reason = summary["refused"]["too-small-1"]
    assert reason.startswith("refused: no backbone fits; the smallest, tiny-3, needs")
    assert "it would take a memory budget of at least" in reason
    log = (mixed_run["out"] / "agents" / "too-small-1.log").read_text()
    assert f"coordinator refused this device: {reason}" in log
    assert summary["rounds"] == 2 and all(r["accepted"] == 2 for r in summary["per_round"])


@pytest.mark.slow
def test_cost_cards_predict_real_peak_rss_within_20_percent(mixed_run: dict[str, Any]) -> None:
    backbone_of = mixed_run["summary"]["agents"]
    for agent_id, backbone in backbone_of.items():
        measured = max(r.peak_rss_mb for r in mixed_run["rows"] if r.agent_id == agent_id)
        predicted = mixed_run["cards"][backbone].peak_train_rss_mb
        print(f"{backbone}: card {predicted:.0f} MB, agent peak {measured:.0f} MB, ratio {predicted / measured:.2f}")
        assert 0.8 <= predicted / measured <= 1.2, (backbone, predicted, measured)  # issue 4's criterion
        # The probe runs the agent's own stack and round code, so it is much closer than the criterion: the old
        # probe (a bare trainer, random ids) read 0.82-0.85 of a real agent and would fail here.
        assert 0.9 <= predicted / measured <= 1.1, (backbone, predicted, measured)
