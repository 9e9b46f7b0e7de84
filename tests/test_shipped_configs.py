"""Every shipped configuration admits the device classes the README names, as the README says.

The README's classes: a Raspberry-Pi class device whose agent may use 384 MB trains MiniLM-L3, a Jetson class
device with 2 GB trains MiniLM-L6. A user once found the Pi class refused under configs/example.toml (0.8 x 384 MB
= 307.2 MB < 308.4 MB) while the demo admitted it at 0.9; now there is one default memory fraction, and each
configuration and fleet file is checked here with the real cost cards of the bundles it builds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from coordinator.assignment import DEFAULT_MEMORY_FRACTION, cost_cards_of
from coordinator.config import RunConfig, load_config
from coordinator.demo import demo_config
from coordinator.fleet import DataSplit, EmulatedAgent, load_fleet, plan_fleet
from coordinator.runner import build_bundles
from export.catalog import CATALOG

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.toml"))
FLEETS = sorted((REPO / "fleets").glob("*.toml"))
README_CLASSES = {"raspberry-pi": (384.0, "minilm-l3"), "jetson": (2048.0, "minilm-l6")}


def decisions(config: RunConfig, agents: list[EmulatedAgent], data: DataSplit) -> dict[str, str | None]:
    cards = [card for b in build_bundles(config).values() for card in cost_cards_of(b.manifest)]
    plans = plan_fleet(agents, cards, config, eval_samples=data.eval_samples(len(config.task.labels)))
    return {p.agent.agent_id: p.decision.backbone for p in plans}


def test_there_are_shipped_configs_and_fleets() -> None:
    assert len(CONFIGS) >= 2 and len(FLEETS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_config_overrides_the_one_memory_fraction(path: Path) -> None:
    raw = tomllib.loads(path.read_text())
    assert "memory_fraction" not in raw, f"{path.name} sets its own memory_fraction"
    assert load_config(path).memory_fraction == DEFAULT_MEMORY_FRACTION == demo_config().memory_fraction


@pytest.mark.parametrize("path", [p for p in CONFIGS
                                  if CATALOG[load_config(p).backbones[0]].modality == "text"], ids=lambda p: p.name)
def test_every_text_config_admits_the_readme_classes(path: Path) -> None:
    config = load_config(path)
    agents = [EmulatedAgent(name, memory) for name, (memory, _) in README_CLASSES.items()]
    got = decisions(config, agents, DataSplit())
    assert got == {name: backbone for name, (_, backbone) in README_CLASSES.items()}, got


@pytest.mark.parametrize("path", FLEETS, ids=lambda p: p.name)
def test_every_fleet_gets_what_its_descriptions_say(path: Path) -> None:
    """A fleet file runs with the demo's configuration (`coordinator demo --fleet`); every class whose description
    names a backbone ("MiniLM-L3", "MiniLM-L6") or says "refused" must get exactly that."""
    fleet = load_fleet(path)
    got = decisions(demo_config(), fleet.agents(), fleet.data)
    checked = 0
    for name, device_class in fleet.classes.items():
        said = re.search(r"MiniLM-(L3|L6)|refused", device_class.description)
        if said is None:
            continue
        expected = None if said.group(0) == "refused" else f"minilm-{said.group(1).lower()}"
        for agent in (a for a in fleet.agents() if a.device_class == name):
            assert got[agent.agent_id] == expected, (path.name, agent.agent_id, device_class.description, got)
            checked += 1
    assert checked >= 2, f"{path.name}: no class description names its backbone"
