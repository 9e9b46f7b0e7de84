"""Images end to end through a real mosquitto: `edge-agent join` on Fashion-MNIST .npz files, two ViT depths,
ORT and PyTorch agents in one fleet, 2 rounds.

Tiny random-init ViTs (plumbing, not learning: tests/test_image_backbone.py trains the real DINOv2), real images
preprocessed on the agent, real agent processes. Each committed round must equal the heterotune rule applied to
exactly the updates the coordinator accepted (tests/harness.py recomputes it independently).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.datasets import FASHION_MNIST_LABELS, load_fashion_mnist, write_fleet_data
from coordinator.runner import run_federation
from coordinator.store import RunStore
from tests.harness import agent_processes, assert_rounds_follow_the_rule

PINS = {"v1": "tiny-vit-2", "v2": "tiny-vit-4", "v3": "tiny-vit-4"}
BACKENDS = {"v1": "ort", "v2": "torch", "v3": "ort"}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    tmp = tmp_path_factory.mktemp("e2e-image")
    data = write_fleet_data(load_fashion_mnist(max_samples=900, seed=1), list(PINS), tmp / "data", alpha=1.0, seed=1,
                            global_per_class=5, max_per_client=80)
    config = RunConfig(run_name="e2e-image", backbones=("tiny-vit-2", "tiny-vit-4"), rounds=2, local_steps=3,
                       min_agents=len(PINS), pinned=PINS, round_timeout_s=120, join_timeout_s=120,
                       task=TaskConfig(name="fashion-mnist", labels=FASHION_MNIST_LABELS, batch_size=8),
                       learning_rate=5e-3)
    extra = {a: ["--backend", b] for a, b in BACKENDS.items()}
    with MosquittoBroker(tmp / "broker") as broker, agent_processes(tmp, data, extra=extra) as agents:
        summary = run_federation(config, tmp / "run", broker=broker.address, start_agents=agents.start)
        codes = agents.wait(60)
        assert all(c == 0 for c in codes.values()), {a: (c, agents.log(a)) for a, c in codes.items()}
    return tmp / "run", summary


def test_every_image_agent_completes_every_round_on_its_backend(image_run: tuple[Path, dict[str, object]]) -> None:
    run_dir, summary = image_run
    assert summary["rounds"] == 2 and summary["agents"] == PINS
    store = RunStore(run_dir)
    try:
        rows = store.metrics()
    finally:
        store.close()
    assert {(r.round, r.agent_id) for r in rows} == {(r, a) for r in (1, 2) for a in PINS}
    assert all(r.accepted and r.bytes_up > 0 for r in rows)
    assert {r.agent_id: r.backend for r in rows} == BACKENDS
    # Accuracy is measured on the agents' own images (and the held-out set) and is a real fraction.
    assert all(r.personal_accuracy is not None and 0.0 <= r.personal_accuracy <= 1.0 and r.global_accuracy is not None
               for r in rows)


def test_committed_rounds_follow_heterotune_on_the_accepted_image_updates(
        image_run: tuple[Path, dict[str, object]]) -> None:
    run_dir, _ = image_run
    assert assert_rounds_follow_the_rule(run_dir, PINS) == 2
