"""Fleet files: what a valid one turns into, and that every mistake is reported with its field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.fleet import MAX_AGENTS, DataSplit, EmulatedAgent, FleetError, load_fleet, parse_fleet
from protocols.topics import validate_agent_id

REPO = Path(__file__).resolve().parent.parent

VALID = """
name = "lab"

[data]
samples_per_agent = 200
global_test_per_class = 10
alpha = 1.0

[classes.pi4-2gb]
count = 2
memory_mb = 384
speed = 0.25
max_round_seconds = 90

[classes.orin-agx-32gb]
memory_mb = 8192
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_valid_fleet_becomes_named_agents_in_file_order(tmp_path: Path) -> None:
    fleet = load_fleet(write(tmp_path, VALID))
    assert fleet.name == "lab"
    assert fleet.agents() == [
        EmulatedAgent("pi4-2gb-1", 384.0, 4.0, 90.0, "pi4-2gb"),
        EmulatedAgent("pi4-2gb-2", 384.0, 4.0, 90.0, "pi4-2gb"),
        EmulatedAgent("orin-agx-32gb-1", 8192.0, 1.0, None, "orin-agx-32gb"),  # count and speed default to 1
    ]
    assert fleet.data == DataSplit(samples_per_agent=200, global_test_per_class=10, alpha=1.0)
    # 200 // 4 own test examples + 10 per class x 3 classes of global test
    assert fleet.data.eval_samples(3) == 50 + 30


def test_data_section_is_optional_and_matches_the_demo_split() -> None:
    fleet = parse_fleet({"classes": {"pi": {"memory_mb": 256}}})
    assert fleet.data == DataSplit(samples_per_agent=600, global_test_per_class=100, alpha=0.3)
    assert fleet.data.eval_samples(3) == 150 + 300


@pytest.mark.parametrize(("text", "expected"), [
    ("[classes.pi]\nspeed = 0.5\n", "classes.pi.memory_mb: required field is missing"),
    ("[classes.pi]\nmemory_mb = 384\nspeed = 2.0\n", "classes.pi.speed: speed must be <= 1: an emulated device "
                                                     "cannot be faster"),
    ("[classes.pi]\nmemory_mb = 384\nspeed = 0\n", "classes.pi.speed: Input should be greater than 0"),
    ("[classes.pi]\nmemory_mb = -1\n", "classes.pi.memory_mb: Input should be greater than 0"),
    ("[classes.pi]\nmemory_mb = nan\n", "classes.pi.memory_mb"),
    ("[classes.pi]\nmemory_mb = 384\ncount = 0\n", "classes.pi.count: Input should be greater than or equal to 1"),
    ("[classes.pi]\nmemroy_mb = 384\n", "classes.pi.memroy_mb: unknown field"),
    ("[classes.pi]\nmemory_mb = 384\nmax_round_seconds = 0\n", "classes.pi.max_round_seconds"),
    ("[classes.pi]\nmemory_mb = '384 MB'\n", "classes.pi.memory_mb: Input should be a valid number"),
    ('[classes."pi 4"]\nmemory_mb = 384\n', "invalid class name(s) ['pi 4']"),
    ('[classes."-pi"]\nmemory_mb = 384\n', "invalid class name(s) ['-pi']"),
    ("name = 'x'\n", "classes: required field is missing"),
    ("[classes]\n", "the fleet has no device classes; add at least one [classes.NAME] table"),
    ("classes = 3\n", "classes: Input should be a valid dictionary"),
    ("fleet = 1\n[classes.pi]\nmemory_mb = 1\n", "fleet: unknown field"),
    ("[data]\nsamples_per_agent = 2\n[classes.pi]\nmemory_mb = 1\n", "data.samples_per_agent"),
    (f"[classes.pi]\nmemory_mb = 384\ncount = {MAX_AGENTS}\n[classes.orin]\nmemory_mb = 2048\n",
     f"the fleet has {MAX_AGENTS + 1} agents; at most {MAX_AGENTS}"),
])
def test_invalid_fleet_names_the_field_and_the_fix(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(FleetError) as excinfo:
        load_fleet(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message


def test_unreadable_files_are_reported_plainly(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match=r"fleet file .*missing.toml does not exist"):
        load_fleet(tmp_path / "missing.toml")
    with pytest.raises(FleetError, match="is a directory"):
        load_fleet(tmp_path)
    with pytest.raises(FleetError, match="is not valid TOML"):
        load_fleet(write(tmp_path, "[classes.pi\nmemory_mb = 1\n"))


def test_duplicate_class_is_a_toml_error(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="is not valid TOML"):
        load_fleet(write(tmp_path, "[classes.pi]\nmemory_mb = 1\n[classes.pi]\nmemory_mb = 2\n"))


@pytest.mark.parametrize("path", sorted((REPO / "fleets").glob("*.toml")), ids=lambda p: p.name)
def test_example_fleets_parse_into_valid_agent_ids(path: Path) -> None:
    agents = load_fleet(path).agents()
    assert agents
    for agent in agents:
        assert validate_agent_id(agent.agent_id) == agent.agent_id
        assert agent.slowdown >= 1


def test_example_demo_fleet_is_the_default_demo() -> None:
    from coordinator.demo import DEMO_FLEET

    agents = load_fleet(REPO / "fleets" / "demo.toml").agents()
    assert sorted(a.memory_mb for a in agents) == sorted(cap for _, cap in DEMO_FLEET)
    assert all(a.slowdown == 1 and a.max_round_seconds is None for a in agents)
