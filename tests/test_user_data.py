"""Bring your own data: `coordinator split` and `coordinator demo --data` on files and folders the test makes.

The demos are real: the `coordinator` command line, its own mosquitto, one `edge-agent join` process per device
and tiny backbones (chosen with --config; without it the modality picks MiniLM or DINOv2, checked separately).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import RunConfig, load_config
from coordinator.datasets import ImageDataset, TextDataset
from coordinator.user_data import (
    IMAGE_BACKBONES,
    TEXT_BACKBONES,
    UserDataError,
    load_user_data,
    split_user_data,
    user_config,
)
from edge_agent.data import load_examples

WORDS = {"sport": ["match", "goal", "team", "coach", "league", "score"],
         "weather": ["rain", "sunny", "storm", "cloud", "wind", "snow"],
         "food": ["pizza", "bread", "soup", "cheese", "salad", "pasta"]}
FILLER = ["the", "a", "today", "very", "we", "it", "was"]


def topic_file(path: Path, n: int = 180, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            label = list(WORDS)[i % 3]
            words = list(rng.choice(WORDS[label], 3)) + list(rng.choice(FILLER, 3))
            rng.shuffle(words)
            handle.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def image_folder(root: Path, per_class: int = 16, seed: int = 0) -> Path:
    """Three classes of 24x24 pictures (a bright band in a different place per class), PNG and one JPEG each,
    and one image of another size (resized on reading)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(("left", "middle", "right")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)
            pixels[:, 8 * c:8 * c + 8] = 230
            image = Image.fromarray(pixels)
            if i == 0:
                image.save(folder / f"{i}.jpg", quality=95)
            elif i == 1:
                image.resize((32, 30)).save(folder / f"{i}.png")
            else:
                image.save(folder / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------- reading, split


def test_text_labels_come_from_the_data_and_the_split_is_balanced_and_complete(tmp_path: Path) -> None:
    ds = load_user_data(topic_file(tmp_path / "topics.jsonl"))
    assert isinstance(ds, TextDataset) and ds.labels == ("food", "sport", "weather") and len(ds.samples) == 180
    files = split_user_data(ds, ["d1", "d2", "d3"], tmp_path / "out", seed=3)
    held = load_examples(files.global_test_file, ds.labels)
    assert np.bincount([e.label for e in held]).tolist() == [12, 12, 12]  # a fifth of the smallest class each
    devices = {a: load_examples(f, ds.labels) for a, f in files.client_files.items()}
    assert sorted(len(v) for v in devices.values()) == [48, 48, 48]  # even split of the other 144
    device_texts = {e.text for v in devices.values() for e in v}  # type: ignore[union-attr]
    held_texts = {e.text for e in held}  # type: ignore[union-attr]
    assert device_texts | held_texts <= {s.text for s in ds.samples} and not device_texts & held_texts
    again = split_user_data(ds, ["d1", "d2", "d3"], tmp_path / "again", seed=3)
    assert (tmp_path / "out" / "clients" / "d2.jsonl").read_text() == (again.client_files["d2"]).read_text()
    skewed = split_user_data(ds, ["d1", "d2", "d3"], tmp_path / "skewed", alpha=0.1, seed=3)
    assert sorted(sum(c) for c in skewed.label_counts.values()) != [48, 48, 48]


def test_image_folder_reads_classes_png_jpeg_and_other_sizes(tmp_path: Path) -> None:
    ds = load_user_data(image_folder(tmp_path / "pictures"))
    assert isinstance(ds, ImageDataset) and ds.labels == ("left", "middle", "right")
    assert ds.images.shape == (48, 24, 24, 3) and ds.images.dtype == np.uint8
    assert np.bincount(ds.label_ids).tolist() == [16, 16, 16]
    # the band is where the class says, also in the JPEG and the resized image
    assert all(int(np.argmax(img.mean(axis=(0, 2)).reshape(3, 8).mean(axis=1))) == label
               for img, label in zip(ds.images, ds.label_ids, strict=True))


def test_backbones_by_modality_and_the_data_labels_reach_the_run(tmp_path: Path) -> None:
    text = user_config(load_user_data(topic_file(tmp_path / "t.csv.jsonl")), RunConfig())
    assert text.backbones == TEXT_BACKBONES and text.task.labels == ("food", "sport", "weather")
    images = user_config(load_user_data(image_folder(tmp_path / "p")), RunConfig())
    assert images.backbones == IMAGE_BACKBONES and images.task.labels == ("left", "middle", "right")
    kept = user_config(load_user_data(tmp_path / "p"), RunConfig(backbones=("tiny-vit-2",)), keep_backbones=True)
    assert kept.backbones == ("tiny-vit-2",) and kept.task.labels == ("left", "middle", "right")


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "a", "label": "x"}\n', r"1 label\(s\) found"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": 1}\n', "mix names"),
    ('{"text": "a", "label": "x"}\nnot json\n', "line 2: not valid JSON"),
])
def test_bad_text_files_give_the_reason(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_user_data(path)


def test_too_little_data_for_the_fleet_says_so(tmp_path: Path) -> None:
    ds = load_user_data(topic_file(tmp_path / "few.jsonl", n=12))
    with pytest.raises(UserDataError, match="fewer devices"):
        split_user_data(ds, [f"d{i}" for i in range(8)], tmp_path / "out")


def test_split_command_writes_the_files_the_config_and_the_join_lines(tmp_path: Path) -> None:
    data = topic_file(tmp_path / "topics.jsonl")
    out = tmp_path / "split"
    result = subprocess.run([sys.executable, "-m", "coordinator.cli", "split", str(data), "--agents", "3", "--out",
                             str(out), "--alpha", "0.5", "--broker", "10.0.0.2:1883"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    config = load_config(out / "config.toml")
    assert config.task.labels == ("food", "sport", "weather") and config.min_agents == 3
    assert f"coordinator run --config {out / 'config.toml'} --broker 10.0.0.2:1883 --out {out / 'run'} " \
           f"--signing-key {out / 'keys' / 'run-key'}" in result.stdout
    joins = [line for line in result.stdout.splitlines() if line.startswith("edge-agent join")]
    assert joins == [f"edge-agent join --broker 10.0.0.2:1883 --id device-0{i} --data {out}/clients/device-0{i}.jsonl "
                     f"--global-test {out}/global_test.jsonl --coordinator-key {out}/keys/run-key.pub"
                     for i in (1, 2, 3)]
    assert (out / "keys" / "run-key").stat().st_mode & 0o077 == 0  # the private half is the coordinator's only
    assert config.allowed_agents == ("device-01", "device-02", "device-03")  # only the split's devices join
    for i in (1, 2, 3):  # every device file is one the agent's own reader takes with the run's labels
        assert len(load_examples(out / "clients" / f"device-0{i}.jsonl", config.task.labels)) >= 2


def test_split_command_rejects_a_bad_file_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("words,label\nhello,x\n")
    result = subprocess.run([sys.executable, "-m", "coordinator.cli", "split", str(bad), "--agents", "2", "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "lacks the column(s) ['text']" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------- the demo

FLEET = """name = "two"
[classes.pi]
count = 1
memory_mb = 384
[classes.jetson]
count = 1
memory_mb = 2048
"""


def run_demo(tmp_path: Path, data: Path, backbones: list[str]) -> tuple[subprocess.CompletedProcess[str], Path]:
    (tmp_path / "fleet.toml").write_text(FLEET)
    (tmp_path / "config.toml").write_text(
        f"backbones = {json.dumps(backbones)}\nrounds = 2\nlocal_steps = 15\nlearning_rate = 0.005\n"
        "round_timeout_s = 180\njoin_timeout_s = 300\n[task]\nmax_length = 32\nbatch_size = 8\n")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "coordinator.cli", "demo", "--data", str(data), "--config",
                             str(tmp_path / "config.toml"), "--fleet", str(tmp_path / "fleet.toml"), "--out", str(out)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result, out


def check_demo(result: subprocess.CompletedProcess[str], out: Path, labels: tuple[str, ...], option: str) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and set(summary["agents"]) == {"pi-1", "jetson-1"}
    final = summary["final"]
    assert set(final["agents"]) == {"pi-1", "jetson-1"}
    for values in final["agents"].values():
        assert 0 <= values["personal_accuracy"] <= 1 and 0 <= values["global_accuracy"] <= 1
    assert 0 <= final["global_accuracy"] <= 1
    lines = result.stdout.splitlines()
    rounds = [i for i, line in enumerate(lines) if line.startswith("  round ")]
    final_line = next(i for i, line in enumerate(lines) if line.startswith("  final model:"))
    assert final_line == rounds[-1] + 1  # the table ends with the final model
    assert f"global accuracy {100 * final['global_accuracy']:.1f} %" in lines[final_line]
    printed = {}
    for agent_id in ("pi-1", "jetson-1"):
        state_dir = out / "devices" / agent_id
        printed[agent_id] = next((line.strip() for line in lines if re.fullmatch(
            rf"\s+edge-agent predict --state-dir {re.escape(str(state_dir))} {option} .+", line)), None)
        assert printed[agent_id] is not None, result.stdout[-2000:]
    # the printed command works as printed (edge-agent = python -m edge_agent.cli): it answers with a data label
    predicted = subprocess.run([sys.executable, "-m", "edge_agent.cli", *shlex.split(printed["pi-1"])[1:], "--json"],
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert json.loads(predicted.stdout)["predictions"][0]["label"] in labels, predicted.stdout
    with sqlite3.connect(out / "coordinator.sqlite") as db:
        stored = json.loads(db.execute("SELECT value FROM run WHERE key = 'config'").fetchone()[0])
    assert tuple(stored["task"]["labels"]) == labels  # the bundles were built for the data's labels


def test_demo_on_a_text_file(tmp_path: Path) -> None:
    result, out = run_demo(tmp_path, topic_file(tmp_path / "topics.jsonl", n=240), ["tiny-3", "tiny-6"])
    check_demo(result, out, ("food", "sport", "weather"), "--text")


def test_demo_on_a_folder_of_class_folders(tmp_path: Path) -> None:
    result, out = run_demo(tmp_path, image_folder(tmp_path / "pictures", per_class=30), ["tiny-vit-2", "tiny-vit-4"])
    check_demo(result, out, ("left", "middle", "right"), "--image")
