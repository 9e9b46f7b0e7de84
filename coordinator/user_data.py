"""Bring your own data: read a labelled file or folder, and turn it into a run over an emulated fleet.

Text: JSONL or CSV with ``text`` and ``label`` (names, or integer indices). Images: an ``.npz`` with arrays
``images`` and ``labels`` (the agents' format), or a folder with one sub-folder per class holding PNG/JPEG files.
The labels come from the data (names sorted, or the indices 0..max), the backbones from the modality, and the
split (a balanced held-out set, the rest spread evenly or Dirichlet-skewed over the devices) from
``coordinator.datasets.write_fleet_data``, so the demo's tweets and the user's data take the same path.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from coordinator.config import RunConfig, TaskConfig
from coordinator.datasets import FleetData, ImageDataset, LabeledDataset, LabeledText, TextDataset, write_fleet_data
from edge_agent.data import CSV_SUFFIXES, JSONL_SUFFIXES, NPZ_SUFFIXES, ImageExample, load_examples
from edge_agent.data_check import labels_for_format_check, raw_labels
from protocols.durable import write_atomic

TEXT_BACKBONES: tuple[str, ...] = ("minilm-l3", "minilm-l6")
IMAGE_BACKBONES: tuple[str, ...] = ("dinov2-s4", "dinov2-s8", "dinov2-s12")
# The learning rates the shipped configs use: images diverged at the text rate (configs/fashion-mnist.toml).
LEARNING_RATES = {"text": 2e-3, "image": 1e-3}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_LABEL_CHARS = 128  # a label travels in JoinAccepted (protocols/messages.py Token)
MAX_LABELS = 1024
MAX_HOLDOUT_PER_CLASS = 100


class UserDataError(ValueError):
    """The user's data cannot be used; the message names the file and the fix."""


def modality_of(ds: LabeledDataset) -> str:
    return "text" if isinstance(ds, TextDataset) else "image"


def backbones_for(modality: str) -> tuple[str, ...]:
    """Text trains MiniLM-L3/L6 (Raspberry-Pi and Jetson class devices); images DINOv2-S cut to 4/8/12 blocks."""
    return TEXT_BACKBONES if modality == "text" else IMAGE_BACKBONES


def data_labels(raw: Sequence[object], where: Path) -> tuple[str, ...]:
    """The run's labels from the labels a file uses: sorted names, or "0".."max" for integer indices."""
    names = {v.strip() for v in raw if isinstance(v, str) and v.strip() and not v.strip().lstrip("-").isdigit()}
    indices = [int(v) for v in raw if (isinstance(v, int) and not isinstance(v, bool))
               or (isinstance(v, str) and v.strip().lstrip("-").isdigit())]
    if names and indices:
        raise UserDataError(f"{where}: labels mix names ({sorted(names)[:3]}) and integer indices "
                            f"({sorted(set(indices))[:3]}); use one or the other")
    labels = tuple(sorted(names)) if names else tuple(str(i) for i in range(max(indices, default=-1) + 1))
    _check_labels(labels, where)
    return labels


def _check_labels(labels: tuple[str, ...], where: Path) -> None:
    if len(labels) < 2:
        raise UserDataError(f"{where}: {len(labels)} label(s) found ({list(labels)}); a classifier needs at "
                            "least 2 classes")
    if len(labels) > MAX_LABELS:
        raise UserDataError(f"{where}: {len(labels)} labels; at most {MAX_LABELS} are supported")
    long = [label for label in labels if len(label) > MAX_LABEL_CHARS]
    if long:
        raise UserDataError(f"{where}: label {long[0][:40]!r}... is longer than {MAX_LABEL_CHARS} characters; "
                            "shorten the label names")


def load_user_data(path: Path) -> LabeledDataset:
    """Read a text file, an .npz, or a folder of class folders of images; raise UserDataError saying what is
    wrong and how to fix it."""
    path = Path(path)
    if path.is_dir():
        return _read_image_folder(path)
    if not path.is_file():
        raise UserDataError(f"{path} does not exist; give a JSONL/CSV file, an .npz or a folder of class folders")
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + CSV_SUFFIXES + NPZ_SUFFIXES:
        raise UserDataError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .csv (text,label), .npz "
                            "(images, labels) or a folder with one sub-folder of PNG/JPEG images per class")
    raw = raw_labels(path)
    load_examples(path, labels_for_format_check(raw)[1])  # the file's format first, with the agents' messages
    labels = data_labels(raw, path)
    examples = load_examples(path, labels)
    if suffix in NPZ_SUFFIXES:
        images = [e for e in examples if isinstance(e, ImageExample)]
        return ImageDataset(path.stem, labels, np.stack([e.image for e in images]),
                            np.array([e.label for e in images], dtype=np.int64))
    return TextDataset(path.stem, labels, tuple(LabeledText(e.text, e.label) for e in examples
                                                if not isinstance(e, ImageExample)))


def _read_image_folder(root: Path) -> ImageDataset:
    """One sub-folder per class (its name is the label), PNG/JPEG files inside, read as RGB.

    Images of different sizes are resized (bilinear) to the most common size, because the agents' format holds
    one array; the backbone resizes every image to its own input size anyway.
    """
    try:
        from PIL import Image
    except ImportError:
        raise UserDataError("reading a folder of PNG/JPEG images needs Pillow: pip install pillow (or save the "
                            "images as an .npz with arrays images and labels)") from None
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    labels = tuple(p.name for p in classes)
    _check_labels(labels, root)
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(classes):
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserDataError(f"{folder}: no PNG/JPEG images; every class folder needs at least one "
                                f"({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, label) for p in found]
    images = []
    for file, _label in files:
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except OSError as exc:
            raise UserDataError(f"{file}: not a readable image ({exc}); remove it or replace it") from None
    size = Counter(image.size for image in images).most_common(1)[0][0]
    pixels = np.stack([np.asarray(image if image.size == size else image.resize(size, Image.Resampling.BILINEAR),
                                  dtype=np.uint8) for image in images])
    return ImageDataset(root.name, labels, pixels, np.array([label for _, label in files], dtype=np.int64))


def split_user_data(ds: LabeledDataset, agent_ids: Sequence[str], out_dir: Path, *, alpha: float | None = None,
                    seed: int = 0) -> FleetData:
    """A balanced held-out set (up to 100 per class, a fifth of the smallest class), the rest spread over the
    agents: evenly (``alpha`` None) or by label proportions drawn from Dirichlet(``alpha``); seeded."""
    counts = np.bincount(ds.label_array(), minlength=len(ds.labels))
    empty = [ds.labels[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise UserDataError(f"{ds.name}: label(s) {empty[:5]} have no examples; every label needs at least 2 "
                            "(one for the held-out set, one for training)")
    per_class = int(max(1, min(MAX_HOLDOUT_PER_CLASS, counts.min() // 5)))
    pool = int(counts.sum()) - per_class * len(ds.labels)
    if pool < 2 * len(agent_ids):
        raise UserDataError(f"{ds.name}: {int(counts.sum())} examples leave {pool} after the held-out set "
                            f"({per_class} per label); {len(agent_ids)} devices need at least 2 each (one to train, "
                            "one to test): give more data or use fewer devices (--agents)")
    min_per_client = max(2, min(10, pool // (2 * len(agent_ids))))
    try:
        return write_fleet_data(ds, agent_ids, out_dir, alpha=alpha, seed=seed, global_per_class=per_class,
                                min_per_client=min_per_client)
    except ValueError as exc:
        raise UserDataError(f"{ds.name}: {exc}") from None


def user_config(ds: LabeledDataset, base: RunConfig, *, keep_backbones: bool = False) -> RunConfig:
    """The run for the user's data: its labels, the modality's backbones and learning rate (unless the base
    config, e.g. from --config, names its own backbones), everything else from ``base``."""
    modality = modality_of(ds)
    task = TaskConfig(**{**base.task.model_dump(), "name": _task_name(ds.name), "labels": ds.labels})
    update: dict[str, object] = {"task": task, "run_name": _task_name(ds.name)}
    if not keep_backbones:
        update.update(backbones=backbones_for(modality), learning_rate=LEARNING_RATES[modality], pinned={})
    return RunConfig.model_validate({**base.model_dump(), **update})


def _task_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "data"
    return cleaned[:64]


# ------------------------------------------------------------------------------------ telling the user


def write_run_config(path: Path, config: RunConfig) -> Path:
    """A run configuration file for `coordinator run --config` with what differs per data set; the rest keeps
    the defaults (coordinator/config.py). Strings are written as JSON strings, which TOML reads the same."""
    lines = [
        f"# Written by `coordinator split` for the data set {config.task.name!r}.",
        f"run_name = {json.dumps(config.run_name)}",
        f"backbones = {json.dumps(list(config.backbones))}",
        f"rounds = {config.rounds}",
        f"local_steps = {config.local_steps}",
        f"learning_rate = {config.learning_rate!r}",
        f"min_agents = {config.min_agents}  # rounds start once this many agents have joined",
        *([f"allowed_agents = {json.dumps(list(config.allowed_agents))}  # only these devices may join"]
          if config.allowed_agents is not None else []),
        "",
        "[task]",
        f"name = {json.dumps(config.task.name)}",
        f"labels = {json.dumps(list(config.task.labels), ensure_ascii=False)}",
        f"max_length = {config.task.max_length}",
        f"batch_size = {config.task.batch_size}",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "\n".join(lines).encode("utf-8"))
    return path


def join_command(files: FleetData, agent_id: str, broker: str, coordinator_key: Path) -> str:
    """The `edge-agent join` line of one device of a split: its files and the run key's public half it verifies
    the coordinator with."""
    return (f"edge-agent join --broker {broker} --id {agent_id} --data {shlex.quote(str(files.client_files[agent_id]))}"
            f" --global-test {shlex.quote(str(files.global_test_file))}"
            f" --coordinator-key {shlex.quote(str(coordinator_key))}")


def predict_command(state_dir: Path, ds: LabeledDataset, example: str) -> str:
    option = "--text" if modality_of(ds) == "text" else "--image"
    return f"edge-agent predict --state-dir {shlex.quote(str(state_dir))} {option} {shlex.quote(example)}"


def example_input(ds: LabeledDataset, source: Path) -> str:
    """Something to try the model on: a text of the data set, or one of its image files."""
    if isinstance(ds, TextDataset):
        words = " ".join(ds.samples[0].text.split()).split(" ")
        return " ".join(words[:12])
    if source.is_dir():
        return str(next(p for p in sorted(source.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES))
    return "IMAGE.png"
