"""Emulated fleets: a TOML file of device classes, and the assignment the coordinator would make for them.

A fleet file says which devices to emulate on this machine, for `coordinator demo --fleet FILE`, and lets
`coordinator assign --explain --fleet FILE` print the assignment arithmetic without running anything::

    name = "mixed"                      # optional

    [data]                              # optional: each agent's share of the tweets (defaults shown)
    samples_per_agent = 600             # at most this many examples per agent (25 % kept as its test split)
    global_test_per_class = 100         # balanced held-out set every agent evaluates the global model on
    alpha = 0.3                         # Dirichlet label skew (smaller = more skewed)

    [classes.pi4-2gb]                   # one table per device class; agents are named pi4-2gb-1, pi4-2gb-2, ...
    count = 2
    memory_mb = 384                     # the agent's memory cap: sent at join and enforced while training
    speed = 0.25                        # compute relative to this machine (1 = as fast); emulated by slowing down
    max_round_seconds = 120             # optional: the longest round the device accepts
    backend = "torch"                   # optional: the agent's trainer backend, "ort" or "torch" (default: auto,
                                        # which is ort on this machine); a Pi has no ORT training wheel
    description = "Raspberry Pi 4, 2 GB, agent capped at 384 MB"

Speed is relative to the machine that runs the emulation, which is also the builder that measured the cost
cards, so an agent at ``speed = s`` reports ``s x`` its measured GFLOP/s and really runs ``1/s`` times slower
(``edge-agent join --slowdown 1/s``). ``assign --explain`` therefore predicts round times as the builder's
divided by ``s``. The same goes for ``backend``: the agent runs with ``edge-agent join --backend``, and the
assignment uses that backend's cost card (the PyTorch backend needs more memory than ONNX Runtime).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coordinator.assignment import CostCard, Decision, DeviceBudget, assign_backbone
from coordinator.config import RunConfig, summarise_validation
from protocols.bundle_manifest import DEFAULT_COST_BACKEND

MAX_AGENTS = 32  # every emulated agent is a process holding a few hundred MB: keep local fleets sane
_CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,55}$")  # + "-NN" stays a valid 64-char agent id


class FleetError(ValueError):
    """A fleet file is invalid; the message names the file, the field and what would be valid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceClass(_Strict):
    """One kind of device and how many of it to emulate."""

    count: int = Field(1, ge=1, le=MAX_AGENTS)
    memory_mb: float = Field(gt=0, allow_inf_nan=False)
    speed: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    max_round_seconds: float | None = Field(None, gt=0, allow_inf_nan=False)
    backend: Literal["ort", "torch"] | None = None  # None: the agent's "auto" (ort wherever it loads)
    description: str = ""

    @property
    def slowdown(self) -> float:
        """The agent's ``--slowdown``: how many times slower than this machine the device runs."""
        return 1.0 / self.speed


class DataSplit(_Strict):
    """How the tweets are split over the fleet (coordinator.datasets.write_fleet_data)."""

    samples_per_agent: int = Field(600, ge=8)
    global_test_per_class: int = Field(100, ge=1)
    alpha: float = Field(0.3, gt=0, allow_inf_nan=False)

    def eval_samples(self, num_labels: int) -> int:
        """Samples an agent evaluates per round at most: its 25 % test split plus the global test set."""
        return self.samples_per_agent // 4 + self.global_test_per_class * num_labels


class Fleet(_Strict):
    name: str = "fleet"
    data: DataSplit = DataSplit()
    classes: dict[str, DeviceClass]

    @field_validator("classes")
    @classmethod
    def _valid_classes(cls, value: dict[str, DeviceClass]) -> dict[str, DeviceClass]:
        if not value:
            raise ValueError("the fleet has no device classes; add at least one [classes.NAME] table")
        bad = [name for name in value if not _CLASS_NAME_RE.fullmatch(name)]
        if bad:
            raise ValueError(f"invalid class name(s) {bad}: use 1-56 letters, digits, '_', '.' or '-', starting "
                             "with a letter or digit (agent ids are NAME-1, NAME-2, ...)")
        return value

    @model_validator(mode="after")
    def _not_too_many(self) -> Fleet:
        total = sum(c.count for c in self.classes.values())
        if total > MAX_AGENTS:
            raise ValueError(f"the fleet has {total} agents; at most {MAX_AGENTS} can be emulated on one machine")
        return self

    def agents(self) -> list[EmulatedAgent]:
        """Every agent of the fleet, class by class in file order: ``NAME-1`` .. ``NAME-count``."""
        return [EmulatedAgent(f"{name}-{i}", c.memory_mb, c.slowdown, c.max_round_seconds, name, c.backend)
                for name, c in self.classes.items() for i in range(1, c.count + 1)]


@dataclass(frozen=True)
class EmulatedAgent:
    """One agent process of an emulated fleet: what `edge-agent join` is told about its device."""

    agent_id: str
    memory_mb: float
    slowdown: float = 1.0
    max_round_seconds: float | None = None
    device_class: str = ""
    backend: str | None = None  # `edge-agent join --backend`; None leaves it at auto


def parse_fleet(raw: Mapping[str, Any], source: str = "fleet") -> Fleet:
    """Validate a parsed fleet document; every problem is reported with its field path."""
    try:
        return Fleet.model_validate(raw)
    except ValidationError as exc:
        raise FleetError(f"{source}: {summarise_validation(exc, _message)}") from None


def _message(err: Mapping[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field (known: count, memory_mb, speed, max_round_seconds, backend, description in a " \
               "class; name, data, classes at the top)"
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "less_than_equal" and err["loc"][-1:] == ("speed",):
        return "speed must be <= 1: an emulated device cannot be faster than the machine emulating it"
    return str(err["msg"])


def load_fleet(path: Path) -> Fleet:
    """Read and validate a fleet file."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FleetError(f"fleet file {path} does not exist") from None
    except IsADirectoryError:
        raise FleetError(f"fleet file {path} is a directory; give the .toml file") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FleetError(f"{path} is not valid TOML: {exc}") from None
    return parse_fleet(raw, source=str(path))


# ------------------------------------------------------------------------------------------ assignment


@dataclass(frozen=True)
class AgentPlan:
    """What the coordinator would decide for one emulated agent, and the inputs it would decide on."""

    agent: EmulatedAgent
    device: DeviceBudget
    eval_samples: int
    pinned: str | None
    decision: Decision


def reference_gflops(cards: Sequence[CostCard]) -> float:
    """This machine's matmul throughput as the cost cards recorded it (median over the ORT probes, or over all
    cards if there is no ORT one: every probe measures the same machine, the ORT cards are the ones there always
    were)."""
    if not cards:
        raise ValueError("no cost cards")
    ort = [c for c in cards if c.backend == DEFAULT_COST_BACKEND] or list(cards)
    return float(statistics.median(c.builder_gflops for c in ort))


def plan_fleet(agents: Sequence[EmulatedAgent], cards: Sequence[CostCard], config: RunConfig, *,
               eval_samples: int, gflops: float | None = None) -> list[AgentPlan]:
    """The engine's decision (`Coordinator._on_join`) for each agent, from the fleet's nominal numbers.

    The real run decides on what each agent measures at join (GFLOP/s divided by its slowdown, and
    ``min(available RAM, cap)``), so a device sitting right at a limit can land on the other side of it.
    ``cards`` may hold every backend's cards; each agent is judged by its own backend's (ORT when unset, which is
    what its ``auto`` resolves to on the builder).
    """
    base = reference_gflops(cards) if gflops is None else gflops
    plans = []
    for agent in agents:
        device = DeviceBudget(agent_id=agent.agent_id, memory_budget_mb=agent.memory_mb,
                              gflops=base / agent.slowdown, max_round_seconds=agent.max_round_seconds,
                              backend=agent.backend)
        pinned = config.pinned.get(agent.agent_id)
        candidates = [c for c in cards if c.backbone == pinned] if pinned else list(cards)
        decision = assign_backbone(device, candidates, local_steps=config.local_steps, eval_samples=eval_samples,
                                   memory_fraction=config.memory_fraction, deadline_seconds=config.round_timeout_s)
        plans.append(AgentPlan(agent, device, eval_samples, pinned, decision))
    return plans


def expected_members(plans: Sequence[AgentPlan]) -> int:
    """How many agents the plan admits (the demo waits for this many before round 1)."""
    return sum(p.decision.backbone is not None for p in plans)


def _fmt(x: float) -> str:
    return f"{x:,.1f}".removesuffix(".0")


def format_plan(plans: Sequence[AgentPlan], cards: Sequence[CostCard], config: RunConfig, *, source: str,
                explain: bool) -> str:
    """The decisions as text; with ``explain`` the cost cards and every candidate's arithmetic too."""
    lines = [f"backbone assignment for {source}: {len(plans)} agents, backbones {', '.join(config.backbones)}"]
    if explain:
        lines += [
            f"rule: peak training RSS <= {config.memory_fraction:g} x memory budget, and predicted round time "
            f"<= the tighter of the round deadline ({_fmt(config.round_timeout_s)} s) and the device's own limit",
            f"round time = ({config.local_steps} local steps x step time + eval samples x eval time per sample) "
            "x builder GFLOP/s / device GFLOP/s",
            "cost cards (measured at export on this builder):",
        ]
        for c in sorted(cards, key=lambda c: (c.size_proxy, c.backbone, c.backend != DEFAULT_COST_BACKEND,
                                              c.backend)):
            lines.append(f"  {c.backbone} ({c.layers} x {c.hidden}) on {c.backend}: peak RSS "
                         f"{_fmt(c.peak_train_rss_mb)} MB, "
                         f"step {c.step_seconds:.3g} s, eval {c.eval_seconds_per_sample:.3g} s/sample, "
                         f"builder {c.builder_gflops:.1f} GFLOP/s")
        for group in _groups(plans):
            first = group[0]
            ids = ", ".join(p.agent.agent_id for p in group)
            limit = ("no own round limit" if first.device.max_round_seconds is None
                     else f"own round limit {_fmt(first.device.max_round_seconds)} s")
            pin = f", pinned to {first.pinned}" if first.pinned else ""
            backend = first.agent.backend or f"{DEFAULT_COST_BACKEND} (auto)"
            lines += [
                "",
                f"{first.agent.device_class or first.agent.agent_id} x{len(group)} ({ids}): memory budget "
                f"{_fmt(first.device.memory_budget_mb)} MB, {first.device.gflops:.1f} GFLOP/s "
                f"(speed {1 / first.agent.slowdown:.3g} x the builder), {limit}, "
                f"{first.eval_samples} eval samples, backend {backend}{pin}",
                *(f"  {line}" for line in first.decision.lines),
                f"  => {first.decision.reason}",
            ]
        lines += ["", "decisions:"]
    width = max(len(p.agent.agent_id) for p in plans) if plans else 0
    for p in plans:
        outcome = p.decision.backbone or "refused"
        lines.append(f"  {p.agent.agent_id:<{width}}  {outcome}")
    return "\n".join(lines)


def _groups(plans: Sequence[AgentPlan]) -> list[list[AgentPlan]]:
    """Consecutive agents of one class with the same inputs share one explanation."""
    groups: list[list[AgentPlan]] = []
    for p in plans:
        last = groups[-1][0] if groups else None
        if (last is not None and p.agent.device_class and last.agent.device_class == p.agent.device_class
                and last.device.memory_budget_mb == p.device.memory_budget_mb and last.pinned == p.pinned
                and last.agent.backend == p.agent.backend
                and math.isclose(last.device.gflops, p.device.gflops)):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def plan_as_json(plans: Sequence[AgentPlan]) -> list[dict[str, Any]]:
    return [{"agent_id": p.agent.agent_id, "class": p.agent.device_class, "backbone": p.decision.backbone,
             "reason": p.decision.reason, "lines": list(p.decision.lines),
             "memory_budget_mb": p.device.memory_budget_mb, "gflops": p.device.gflops,
             "max_round_seconds": p.device.max_round_seconds, "eval_samples": p.eval_samples,
             "slowdown": p.agent.slowdown, "backend": p.agent.backend} for p in plans]
