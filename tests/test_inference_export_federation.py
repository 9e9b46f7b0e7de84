"""After a real federation (real mosquitto, real `edge-agent join` processes, one on the ORT backend and one on the
PyTorch backend), each device's exported graph, built from the state the agent left on disk, gives the logits the
agent's own trainer gives for those tensors, within 1e-4 on 64 of its samples: MiniLM-L3 (text) and DINOv2 at 4
blocks (images). `edge-agent export` itself runs as a subprocess, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.datasets import FASHION_MNIST_LABELS, load_fashion_mnist, write_fleet_data
from coordinator.runner import run_federation
from edge_agent.agent import make_trainer
from edge_agent.data import ImageExample, load_examples
from edge_agent.device_state import default_state_dir, load_model
from edge_agent.inference_package import open_package
from edge_agent.inputs import BatchEncoder
from edge_agent.model_export import read_manifest
from edge_agent.predict import Predictor
from tests.harness import agent_processes, fleet_data

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = {"o1": "ort", "t1": "torch"}
SAMPLES = 64


def federate(tmp: Path, backbone: str) -> dict[str, Path]:
    """One round on real mosquitto with one ORT and one torch agent; returns each agent's data file."""
    pins = dict.fromkeys(BACKENDS, backbone)
    if backbone.startswith("dinov2"):
        data = write_fleet_data(load_fashion_mnist(max_samples=600, seed=1), list(BACKENDS), tmp / "data", alpha=1.0,
                                seed=1, global_per_class=3, max_per_client=120)
        task = TaskConfig(name="fashion-mnist", labels=FASHION_MNIST_LABELS, batch_size=8)
    else:
        data = fleet_data(tmp, list(BACKENDS))
        task = TaskConfig(max_length=64, batch_size=8)
    config = RunConfig(run_name=f"export-{backbone}", backbones=(backbone,), rounds=1, local_steps=4,
                       min_agents=len(pins), pinned=pins, task=task, round_timeout_s=900, join_timeout_s=900,
                       learning_rate=1e-2, seed=4)
    extra = {a: ["--backend", b] for a, b in BACKENDS.items()}
    with MosquittoBroker(tmp / "broker") as broker, agent_processes(tmp, data, extra=extra) as agents:
        run_federation(config, tmp / "run", broker=broker.address, start_agents=agents.start)
        codes = agents.wait(120)
    assert all(c == 0 for c in codes.values()), {a: agents.log(a) for a in BACKENDS}
    return data.client_files


@pytest.mark.parametrize("backbone", ["minilm-l3", "dinov2-s4"])
def test_each_devices_export_after_a_real_federation_equals_its_own_logits(backbone: str, tmp_path: Path) -> None:
    files = federate(tmp_path, backbone)
    for agent_id, backend in BACKENDS.items():
        state_dir = default_state_dir(files[agent_id], agent_id)
        model = load_model(state_dir)
        assert model.round_id == 2 and model.backbone == backbone  # round 1, then the final evaluation
        out = tmp_path / f"export-{agent_id}"
        result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "export", "--state-dir", str(state_dir),
                                 "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr
        package = open_package(out)
        assert package.card.backend == backend and package.card.agent_id == agent_id

        manifest = read_manifest(model.bundle_dir)
        samples = load_examples(files[agent_id], manifest.task.labels)[:SAMPLES]
        assert len(samples) == SAMPLES
        encoder = BatchEncoder(model.bundle_dir, manifest)
        trainer = make_trainer(backend, model.bundle_dir, threads=1)  # the agent's own trainer, on the tensors it saved
        trainer.start_round(model.tensors, 0.0)
        own = trainer.predict([encoder.encode(samples[i : i + 8]) for i in range(0, SAMPLES, 8)])
        predictor = Predictor(package.graph_path(), modality=package.card.modality, labels=package.card.labels,
                              max_length=package.card.max_length, image_size=package.card.image_size,
                              tokenizer=package.tokenizer)
        raw = [s.image if isinstance(s, ImageExample) else s.text for s in samples]
        exported = np.concatenate([x for _, x in predictor.batches(raw, 16)])
        assert float(np.abs(exported - own).max()) <= 1e-4, (agent_id, backend)
        trainer.start_round({}, 0.0)  # the bundle's initial tensors
        initial = trainer.predict([encoder.encode(samples[:8])])
        assert float(np.abs(initial - own[:8]).max()) > 1e-2  # the federation really moved this device's model
