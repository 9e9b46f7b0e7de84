"""`coordinator export`: a run with a shared head exports its group's aggregated model as an inference package
whose logits are the aggregate's (checked against ONNX Runtime Training running the same tensors); a run with the
default local head is refused with the reason and both ways out.

A real federation: mosquitto on loopback, the coordinator, two `edge-agent join` processes (tiny-3, quick).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import MosquittoBroker
from coordinator.config import RunConfig, TaskConfig
from coordinator.runner import build_bundles, run_federation
from coordinator.store import RunStore, load_state
from edge_agent.data import Example, load_examples
from edge_agent.inference_package import open_package
from edge_agent.inputs import BatchEncoder
from edge_agent.predict import Predictor
from edge_agent.trainers.ort import OrtTrainer
from tests.harness import agent_processes, fleet_data

ROOT = Path(__file__).resolve().parent.parent
PINS = {"a1": "tiny-3", "a2": "tiny-3"}


def config(head: str) -> RunConfig:
    return RunConfig(run_name=f"export-{head}", backbones=("tiny-3",), rounds=2, local_steps=3, min_agents=len(PINS),
                     pinned=PINS, task=TaskConfig(max_length=32, batch_size=8), round_timeout_s=120,
                     join_timeout_s=120, learning_rate=5e-3, seed=2, scopes={"head": head})


def coordinator_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


@pytest.fixture(scope="module")
def group_head_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("coordinator-export")
    data = fleet_data(tmp, list(PINS))
    with MosquittoBroker(tmp / "broker") as broker, agent_processes(tmp, data) as agents:
        run_federation(config("group"), tmp / "run", broker=broker.address, start_agents=agents.start)
        codes = agents.wait(60)
    assert all(c == 0 for c in codes.values()), {a: agents.log(a) for a in PINS}
    return tmp / "run", data.global_test_file


def test_a_group_head_run_exports_the_aggregated_model(group_head_run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, test_file = group_head_run
    result = coordinator_cli("export", str(run_dir), "--backbone", "tiny-3", "--out", str(tmp_path / "pkg"))
    assert result.returncode == 0, result.stderr
    package = open_package(tmp_path / "pkg")
    assert package.card.source == "federation" and package.card.rounds == 2
    assert json.loads((tmp_path / "pkg" / "model_card.json").read_text())["metrics"]["devices"] == len(PINS)

    state = load_state(run_dir / "tensors" / "round-0002.safetensors")
    aggregate = {**state.global_tensors, **state.group_tensors["tiny-3"]}
    bundle = build_bundles(config("group"))["tiny-3"]
    assert "head.weight" in aggregate and set(aggregate) == {t.name for t in bundle.manifest.tensors}
    examples = [e for e in load_examples(test_file, bundle.manifest.task.labels) if isinstance(e, Example)][:48]
    trainer = OrtTrainer(bundle.directory, threads=1)
    trainer.start_round(aggregate, 0.0)
    encoder = BatchEncoder(bundle.directory, bundle.manifest)
    expected = trainer.predict([encoder.encode(examples[i : i + 8]) for i in range(0, len(examples), 8)])
    predictor = Predictor(package.graph_path(), modality="text", labels=package.card.labels,
                          max_length=package.card.max_length, tokenizer=package.tokenizer)
    got = np.concatenate([x for _, x in predictor.batches([e.text for e in examples], 16)])
    assert float(np.abs(got - expected).max()) <= 1e-4
    initial = bundle.initial_tensors()
    assert not np.array_equal(initial["head.weight"], aggregate["head.weight"])  # the head was trained and averaged


def test_a_local_head_run_is_refused_with_the_reason_and_the_fix(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    try:
        store.set_meta("config", config("local").model_dump(mode="json"))
    finally:
        store.close()
    result = coordinator_cli("export", str(tmp_path / "run"), "--backbone", "tiny-3", "--out", str(tmp_path / "pkg"))
    assert result.returncode == 2
    assert 'head = "local"' in result.stderr and 'head = "group"' in result.stderr
    assert "edge-agent export" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "pkg").exists()
    result = coordinator_cli("export", str(tmp_path / "run"), "--backbone", "minilm-l6", "--out", str(tmp_path / "p"))
    assert result.returncode == 2 and "no backbone 'minilm-l6'" in result.stderr
