"""`edge-agent export` and `edge-agent predict` as a user runs them (subprocesses of the real CLI), on a device
state saved by the agent's own state code from a real MiniLM-L3 model trained one round in process; and every
bad input the issue lists, each with the message a user needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.datasets import load_tweet_sentiment, write_fleet_data
from edge_agent.agent import make_trainer
from edge_agent.data import Example, load_examples
from edge_agent.device_state import DeviceModel, save_model
from edge_agent.inference_package import CARD_JSON, MODEL, TOKENIZER, PackageError, open_package
from edge_agent.local_round import LocalLearner, RoundOutcome, RoundPlan
from tests.test_inference_export import uncosted_bundle

ROOT = Path(__file__).resolve().parent.parent
LONG = "the service was slow and the food was cold " * 40  # far over the bundle's 64 tokens


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, input=stdin, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def write_jsonl(path: Path, examples: list[Example], labels: tuple[str, ...], *, with_labels: bool = True) -> Path:
    with path.open("w") as f:
        for e in examples:
            f.write(json.dumps({"text": e.text, **({"label": labels[e.label]} if with_labels else {})}) + "\n")
    return path


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, LocalLearner, RoundOutcome]:
    """(state dir, data file, learner, its round outcome) of a device that trained one round and saved it."""
    tmp = tmp_path_factory.mktemp("predict-cli")
    data = write_fleet_data(load_tweet_sentiment(max_samples=600, seed=4), ["d1"], tmp / "data", alpha=1.0, seed=4,
                            global_per_class=5, max_per_client=160).client_files["d1"]
    bundle = uncosted_bundle("minilm-l3")
    labels = bundle.manifest.task.labels
    learner = LocalLearner("d1", bundle.directory, bundle.manifest,
                           make_trainer("ort", bundle.directory, threads=1), load_examples(data, labels))
    outcome = learner.run_round(RoundPlan(round_id=1, local_steps=6, batch_size=8, learning_rate=2e-2, seed=1,
                                          upload_names=()), {})
    state = tmp / "state"
    save_model(state, DeviceModel(
        agent_id="d1", run_id="run-a", round_id=1, bundle_sha=bundle.sha256, bundle_dir=bundle.directory,
        backbone=bundle.manifest.backbone, labels=labels, tensors=dict(learner.kept), received={}, optimizer={},
        metrics={"personal_accuracy": outcome.personal.accuracy, "n_train": outcome.n_train,
                 "n_test": outcome.personal.total, "backend": "ort", "method": "heterotune"},
        saved_unix=time.time()))
    return state, data, learner, outcome


@pytest.fixture(scope="module")
def package(device: tuple[Path, Path, LocalLearner, RoundOutcome], tmp_path_factory: pytest.TempPathFactory) -> Path:
    state, data, _, _ = device
    out = tmp_path_factory.mktemp("exported") / "model"
    result = cli("export", "--state-dir", str(state), "--out", str(out), "--int8", "--data", str(data))
    assert result.returncode == 0, result.stderr
    assert "edge-agent predict --model" in result.stdout
    return out


def test_export_writes_a_verified_package_with_a_measured_card(package: Path,
                                                               device: tuple[Path, Path, LocalLearner, RoundOutcome]
                                                               ) -> None:
    _, _, learner, outcome = device
    card = json.loads((package / CARD_JSON).read_text())
    assert card["backbone"] == "minilm-l3" and card["run_id"] == "run-a" and card["rounds"] == 1
    assert card["training_samples"] == outcome.n_train and card["agent_id"] == "d1"
    assert card["metrics"]["personal_accuracy"] == pytest.approx(outcome.personal.accuracy)
    assert open_package(package).card.files[MODEL] == card["files"][MODEL]
    int8 = card["int8"]
    assert int8["size_mb"] < 0.5 * int8["fp32_size_mb"]
    assert int8["samples"] == len(learner.test)
    # The fp32 graph's accuracy on the device's own test split is the accuracy the device reported.
    assert int8["fp32_accuracy"] == pytest.approx(outcome.personal.accuracy)
    assert abs(int8["accuracy_change_points"] - 100 * (int8["int8_accuracy"] - int8["fp32_accuracy"])) < 0.01
    assert "sha256" in (package / "MODEL_CARD.md").read_text()


def test_predict_on_the_test_split_gives_the_reported_accuracy(package: Path, tmp_path: Path,
                                                               device: tuple[Path, Path, LocalLearner, RoundOutcome]
                                                               ) -> None:
    _, _, learner, outcome = device
    labels = open_package(package).card.labels
    test_file = write_jsonl(tmp_path / "test.jsonl", learner.test, labels)  # type: ignore[arg-type]
    result = cli("predict", "--model", str(package), "--file", str(test_file), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["accuracy"] == pytest.approx(outcome.personal.accuracy)
    assert len(doc["predictions"]) == len(learner.test)
    first = doc["predictions"][0]
    assert first["label"] in labels and abs(sum(first["probabilities"].values()) - 1) < 1e-4


def test_state_dir_and_package_and_standalone_example_agree(package: Path,
                                                            device: tuple[Path, Path, LocalLearner, RoundOutcome]
                                                            ) -> None:
    state, _, _, _ = device
    texts = ["I love this, best day ever", "worst flight of my life", "the meeting is at noon"]
    args = [a for t in texts for a in ("--text", t)]
    from_package = json.loads(cli("predict", "--model", str(package), *args, "--json").stdout)
    from_state = json.loads(cli("predict", "--state-dir", str(state), *args, "--json").stdout)
    ours = [(p["label"], round(p["probability"], 4)) for p in from_package["predictions"]]
    assert ours == [(p["label"], round(p["probability"], 4)) for p in from_state["predictions"]]
    example = subprocess.run([sys.executable, str(package / "predict_example.py"), *args], capture_output=True,
                             text=True, timeout=300, cwd=package)
    assert example.returncode == 0, example.stderr
    standalone = [(line.split("\t")[0], round(float(line.split("\t")[1]), 3)) for line in example.stdout.splitlines()]
    assert standalone == [(label, round(p, 3)) for label, p in ours]
    piped = cli("predict", "--model", str(package), stdin="\n".join(texts) + "\n")
    assert [line.split("\t")[0] for line in piped.stdout.splitlines()] == [label for label, _ in ours]


BLOCK_PROBE = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "onnx") or name.startswith("onnxruntime.training."):
            raise ImportError(f"{{name}} is not installed on this device")
        return None
sys.meta_path.insert(0, Block())
from pathlib import Path
from edge_agent.predict_cli import run_predict
code = run_predict(model=Path({model!r}), state_dir=None, run=None, texts=["a fine day"], file=None, images=[],
                   as_json=False, batch_size=16, threads=1, int8=True)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx")
                or (m.startswith("onnxruntime.training.") and m != "onnxruntime.training.ortmodule"))
assert code == 0 and not leaked, (code, leaked)
print("ok")
"""


def test_predict_needs_only_the_inference_api(package: Path) -> None:
    """With torch, transformers, onnx and every onnxruntime.training module made unimportable, predict (fp32 and
    int8) still works: the plain onnxruntime package is enough."""
    result = subprocess.run([sys.executable, "-c", BLOCK_PROBE.format(model=str(package))], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


# --- bad input -------------------------------------------------------------------------------------------------


def copy_package(package: Path, target: Path) -> Path:
    target.mkdir()
    for path in package.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_a_missing_or_foreign_file_or_a_newer_format_is_refused_with_the_fix(package: Path, tmp_path: Path) -> None:
    missing = copy_package(package, tmp_path / "missing")
    (missing / TOKENIZER).unlink()
    with pytest.raises(PackageError, match=r"missing tokenizer\.json: copy the whole exported directory"):
        open_package(missing)
    foreign = copy_package(package, tmp_path / "foreign")
    data = bytearray((foreign / MODEL).read_bytes())
    data[len(data) // 2] ^= 1
    (foreign / MODEL).write_bytes(bytes(data))
    result = cli("predict", "--model", str(foreign), "--text", "hello")
    assert result.returncode == 2 and "does not belong to this export" in result.stderr
    assert "Traceback" not in result.stderr
    newer = copy_package(package, tmp_path / "newer")
    card = json.loads((newer / CARD_JSON).read_text())
    (newer / CARD_JSON).write_text(json.dumps({**card, "format": card["format"] + 1}))
    result = cli("predict", "--model", str(newer), "--text", "hello")
    assert result.returncode == 2 and "newer HeteroTune" in result.stderr and "upgrade" in result.stderr
    result = cli("predict", "--model", str(tmp_path), "--text", "hello")  # not a package at all
    assert result.returncode == 2 and "not an exported model" in result.stderr


def test_an_empty_input_file_is_an_error_that_says_so(package: Path, tmp_path: Path) -> None:
    for name in ("empty.jsonl", "empty.csv"):
        (tmp_path / name).write_text("" if name.endswith("jsonl") else "text,label\n")
        result = cli("predict", "--model", str(package), "--file", str(tmp_path / name))
        assert result.returncode == 2 and "holds no inputs" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_mixed_or_missing_inputs_are_refused(package: Path, tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text('{"text": "fine"}\n')
    result = cli("predict", "--model", str(package), "--text", "a", "--file", str(tmp_path / "t.jsonl"))
    assert result.returncode == 2 and "one kind of input" in result.stderr
    result = cli("predict", "--model", str(package), "--image", str(tmp_path / "t.jsonl"))
    assert result.returncode == 2 and "text model" in result.stderr
    result = cli("predict", "--model", str(package), stdin="")
    assert result.returncode == 2 and "stdin held no text" in result.stderr


def test_a_text_over_the_maximum_length_is_truncated_and_said_once(package: Path) -> None:
    result = cli("predict", "--model", str(package), "--text", LONG, "--text", LONG + " again", "--text", "short")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "truncated" in line]
    assert notes == ["note: 2 text(s) longer than 64 tokens were truncated to it (as in training)"]
    assert len(result.stdout.splitlines()) == 3


def test_export_refuses_a_state_that_does_not_fit_and_a_missing_state(
        device: tuple[Path, Path, LocalLearner, RoundOutcome], tmp_path: Path) -> None:
    _, _, learner, _ = device
    result = cli("export", "--state-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "no device state" in result.stderr
    bundle = uncosted_bundle("minilm-l3")
    wrong = {**learner.kept, "head.weight": np.zeros((5, 384), np.float32)}
    save_model(tmp_path / "wrong", DeviceModel(
        agent_id="d1", run_id="run-b", round_id=1, bundle_sha=bundle.sha256, bundle_dir=bundle.directory,
        backbone="minilm-l3", labels=bundle.manifest.task.labels, tensors=wrong, received={}, optimizer={},
        metrics={}, saved_unix=time.time()))
    result = cli("export", "--state-dir", str(tmp_path / "wrong"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "head.weight" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
