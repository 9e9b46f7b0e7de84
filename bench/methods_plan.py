"""What the method benchmark runs: the methods, the fleet, the regime and the budget of each mode.

Why a plan of its own: every method must see the same agents, data files, seeds and training budget, so the
comparison is paired; deriving each method's ``RunConfig`` from one ``BenchSettings`` in one place makes that
hard to get wrong. ``smallest-common`` is not an aggregation rule of its own: it is ``group-fedavg`` with a
single backbone group (the smallest), i.e. FedAvg of every adapter tensor across the whole fleet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.config import RunConfig, TaskConfig
from export.catalog import get_backbone

METHODS: tuple[str, ...] = ("heterotune", "heterotune-noalign", "group-fedavg", "local", "smallest-common")
BASELINES: tuple[str, ...] = ("group-fedavg", "local")  # paired differences are reported against these


@dataclass(frozen=True)
class Regime:
    """How the data is split: label skew, data per agent, and the balanced held-out set for the global view."""

    name: str
    alpha: float  # Dirichlet concentration over labels (lower = more skew)
    train_per_agent: int  # the agent keeps 75 % of its file for training, 25 % as its local test split
    global_per_class: int  # balanced held-out test set, no agent trains on it
    dataset_samples: int = 6000  # tweets drawn (seeded) from the 38k corpus before splitting

    @property
    def per_agent_file(self) -> int:
        """Samples written per agent so that 75 % of them is ``train_per_agent`` (the agent splits 75/25)."""
        return round(self.train_per_agent / 0.75)


@dataclass(frozen=True)
class BenchSettings:
    mode: str
    backbones: tuple[str, ...]
    agents_per_backbone: int
    rounds: int
    local_steps: int
    learning_rate: float
    seeds: tuple[int, ...]
    regime: Regime
    methods: tuple[str, ...] = METHODS
    max_length: int = 64  # the demo's bundles (keeps the bundle cache shared with ./run demo)
    batch_size: int = 16
    dema: dict[str, int] = field(default_factory=dict)  # DemaSettings overrides (none: the defaults)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def agents(self) -> dict[str, str]:
        """Agent id -> its device's own backbone (the largest it fits), smallest backbone first."""
        return {f"{b}-{i}": b for b in self.backbones for i in range(self.agents_per_backbone)}

    def smallest(self) -> str:
        return min(self.backbones, key=lambda b: (get_backbone(b).layers * get_backbone(b).hidden ** 2, b))


LOW_DATA = Regime("dirichlet-1.0, 100 train tweets/agent", alpha=1.0, train_per_agent=100, global_per_class=20)

QUICK = BenchSettings(mode="quick", backbones=("minilm-l3", "minilm-l6"), agents_per_backbone=3, rounds=3,
                      local_steps=8, learning_rate=2e-3, seeds=(0, 1), regime=LOW_DATA)

# Tiny random-init backbones: exercises the whole runner in about a minute; says nothing about learning.
SMOKE = BenchSettings(mode="smoke", backbones=("tiny-3", "tiny-6"), agents_per_backbone=2, rounds=2, local_steps=3,
                      learning_rate=5e-3, seeds=(0, 1), max_length=32, batch_size=8,
                      regime=Regime("smoke", alpha=1.0, train_per_agent=60, global_per_class=10,
                                    dataset_samples=1500))

MODES: dict[str, BenchSettings] = {s.mode: s for s in (QUICK, SMOKE)}


def method_config(settings: BenchSettings, method: str, seed: int) -> tuple[RunConfig, dict[str, str]]:
    """The RunConfig the MQTT engine would run for this method, and agent id -> backbone it trains on."""
    if method not in settings.methods:
        raise ValueError(f"unknown benchmark method {method!r}; known: {', '.join(settings.methods)}")
    agents = settings.agents()
    backbones = settings.backbones
    engine_method = method
    if method == "smallest-common":
        smallest = settings.smallest()
        agents = dict.fromkeys(agents, smallest)
        backbones = (smallest,)
        engine_method = "group-fedavg"
    config = RunConfig(run_name=f"bench-{method}-s{seed}", method=engine_method, backbones=backbones,
                       rounds=settings.rounds, local_steps=settings.local_steps,
                       learning_rate=settings.learning_rate, min_agents=len(agents), seed=seed,
                       task=TaskConfig(max_length=settings.max_length, batch_size=settings.batch_size),
                       dema=settings.dema or {}, pinned=agents)
    return config, agents
