"""What the Flower server and client apps share: the run's spec and tensor <-> ArrayRecord conversion.

Why reuse instead of a Flower-style rewrite: the benchmark compares plumbing, so everything that decides the
tensors is the product's own code (edge_agent.local_round.LocalLearner with the PyTorch trainer backend,
coordinator.federation_state and the run's aggregation strategy), exactly as bench/methods_federation.py uses
it in process. Only the transport differs: Flower messages instead of MQTT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context


@dataclass(frozen=True)
class AgentSpec:
    agent_id: str
    backbone: str
    data_file: Path


@dataclass(frozen=True)
class Spec:
    """One benchmark run: the RunConfig (JSON), bundle directories per backbone, the fleet in partition order,
    the global test file and where the ServerApp writes its result."""

    config: dict[str, Any]
    bundles: dict[str, Path]
    agents: tuple[AgentSpec, ...]
    global_test: Path
    result: Path
    threads: int


def load_spec(context: Context) -> Spec:
    path = str(context.run_config.get("spec", ""))
    if not path:
        raise ValueError("run config 'spec' is empty: run this app through bench/peers.py, which writes the spec")
    raw = json.loads(Path(path).read_text())
    agents = tuple(AgentSpec(a["agent_id"], a["backbone"], Path(a["data_file"])) for a in raw["agents"])
    return Spec(raw["config"], {k: Path(v) for k, v in raw["bundles"].items()}, agents, Path(raw["global_test"]),
                Path(raw["result"]), int(raw.get("threads", 1)))


def agent_of(context: Context, spec: Spec) -> AgentSpec:
    """This node's device: the spec's agent at the node's partition id (deployment: --node-config; simulation:
    Flower's own partition ids)."""
    index = int(context.node_config["partition-id"])
    if not 0 <= index < len(spec.agents):
        raise ValueError(f"partition-id {index} is outside the spec's {len(spec.agents)} agents")
    return spec.agents[index]


def to_record(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in sorted(tensors.items())})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: np.asarray(array.numpy()) for name, array in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Serialized array payload of a record (Flower's Array.data), what its message carries in tensors."""
    return sum(len(array.data) for array in record.values())
