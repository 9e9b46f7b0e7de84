"""A device's fine-tuned model on its own disk: saved after every round, resumed after a restart, served later.

Why this exists: the local head (and every adapter the device trained) lives only in `LocalLearner.kept`; without
a durable copy an agent killed mid-run starts again from the initial head, and after `Finish` nothing it trained
is left. This module is the only place that reads or writes that copy.

Layout (docs/device-state.md)::

    <state_dir>/<run>/<bundle sha, 16 hex>/model.json        newest state: metadata + sha256 of its tensor file
                                            model.prev.json   the previous good state
                                            tensors-<sha256 prefix>.safetensors   one immutable file per state

A state is a (json, tensor file) pair; the json is the commit point. Saving writes the tensor file under a new
name (temp file, fsync, rename, dir fsync), moves the current json to ``model.prev.json`` only if the current
state verifies, then commits the new json the same atomic way and removes tensor files neither json names. A
crash at any point leaves either the new state or the previous good one loadable. Loading verifies everything
(json checksum, tensor file sha256, names, shapes, finiteness) and falls back to the previous copy with a
warning; a state for another run or bundle sits in another directory and is never returned for the wrong one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocols.durable import write_atomic

log = logging.getLogger("edge_agent.device_state")

STATE_FORMAT = 1
CURRENT, PREVIOUS = "model.json", "model.prev.json"
_SECTIONS = ("tensors", "received", "optimizer", "before")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TENSOR_FILE = re.compile(r"^tensors-[0-9a-f]{16}\.safetensors$")
# Plausibility bounds on what a state file may hold (a state is adapters + a head, never a backbone).
MAX_TENSORS = 4096
MAX_NDIM = 4
MAX_ELEMENTS = 64 * 1024 * 1024  # per state file, all sections together (256 MB of float32)
MAX_METRIC_TEXT = 64

Metric = float | int | str | None


class DeviceStateError(Exception):
    """No usable device state: the message says what is wrong and what to do."""


class NoDeviceState(DeviceStateError):
    """Nothing was ever saved for what was asked (a first start, not a fault)."""


@dataclass(frozen=True)
class DeviceModel:
    """Everything a device trained in one run, as of its last completed round."""

    agent_id: str
    run_id: str
    round_id: int  # last completed round
    bundle_sha: str
    bundle_dir: Path  # where the bundle was unpacked (the agent's bundle cache) at save time
    backbone: str
    labels: tuple[str, ...]
    tensors: dict[str, np.ndarray]  # every trainable tensor incl. the local head (LocalLearner.kept after the round)
    received: dict[str, np.ndarray]  # the global/group tensors received for that round
    optimizer: dict[str, np.ndarray]  # optimizer state where the backend exposes it ({} otherwise)
    metrics: dict[str, Metric]  # personal_accuracy, global_accuracy, n_train, n_test, train_loss, backend, method
    saved_unix: float
    # The kept tensors that were not received, as they were before that round: a round the coordinator runs
    # again (abandoned, or its coordinator resumed) restarts from them, as LocalLearner does in memory.
    before: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class StateSummary:
    """What `list_models` reports per saved state: where it is, what it is, and whether it loads."""

    path: Path  # the state's directory
    agent_id: str
    run_id: str
    round_id: int
    bundle_sha: str
    backbone: str
    saved_unix: float
    metrics: dict[str, Metric]
    usable: bool  # the newest or the previous copy verifies
    problem: str | None  # why the newest copy does not load (None when it does)


# --- pure checks ---------------------------------------------------------------------------------------------


def safe_dir_name(value: str) -> str:
    """A directory name for a run id or bundle sha that came over the network: itself when it is a plain name,
    else a digest of it (so '../x' or 'a/b' can never leave the state directory)."""
    if _SHA256.fullmatch(value):
        return value[:16]
    if _SAFE_NAME.fullmatch(value) and value not in (".", ".."):
        return value
    return "run-" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def json_checksum(meta: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``meta`` without its own checksum field (catches bit flips in the json)."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# Set (to N) in the metrics of the state a run's final evaluation saves: that state's round_id is the evaluation's
# round number, N + 1 of an N-round run, and resuming relies on it; people should read "final evaluation of round N".
FINAL_EVALUATION_OF = "final_evaluation_of_round"


def trained_rounds(round_id: int, metrics: Mapping[str, Any]) -> int:
    """The rounds the model was trained for: ``round_id``, or N for the final evaluation after round N."""
    final = metrics.get(FINAL_EVALUATION_OF)
    return final if isinstance(final, int) and not isinstance(final, bool) and 0 <= final < round_id else round_id


def round_label(round_id: int, metrics: Mapping[str, Any]) -> str:
    """'round 3', or 'the final evaluation of round 5' for the state a run's final evaluation saved."""
    trained = trained_rounds(round_id, metrics)
    return f"round {round_id}" if trained == round_id else f"the final evaluation of round {trained}"


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, Metric]:
    """Metrics JSON can hold: finite numbers, short strings, None (NaN, e.g. an accuracy over 0 samples, -> None)."""
    out: dict[str, Metric] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, int, np.integer)):
            out[str(key)] = int(value)
        elif isinstance(value, (float, np.floating)):
            out[str(key)] = float(value) if math.isfinite(float(value)) else None
        elif isinstance(value, str):
            out[str(key)] = value[:MAX_METRIC_TEXT]
        else:
            out[str(key)] = None
    return out


def tensor_problems(sections: Mapping[str, Mapping[str, np.ndarray]],
                    expected: Mapping[str, tuple[int, ...]] | None = None) -> list[str]:
    """Everything implausible about a state's tensors (empty list = fine): no trainable tensors, too many or too
    large, a non-numeric dtype, a NaN/inf value, or (given the bundle's trainable shapes) a name or shape that
    does not fit that bundle."""
    problems: list[str] = []
    tensors = sections.get("tensors", {})
    if not tensors:
        problems.append("it holds no trainable tensors")
    count = sum(len(section) for section in sections.values())
    elements = sum(int(np.asarray(v).size) for section in sections.values() for v in section.values())
    if count > MAX_TENSORS or elements > MAX_ELEMENTS:
        problems.append(f"{count} tensors / {elements} values is more than a device state holds")
        return problems
    for section, named in sections.items():
        for name, value in named.items():
            array = np.asarray(value)
            if array.ndim > MAX_NDIM or array.dtype.kind not in "fiu":
                problems.append(f"{section} tensor '{name}' has an implausible shape {array.shape} or dtype "
                                f"{array.dtype}")
            elif array.dtype.kind == "f" and not np.isfinite(array).all():
                problems.append(f"{section} tensor '{name}' holds NaN or infinite values")
    if expected is not None:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        wrong = sorted(name for name in set(expected) & set(tensors)
                       if tuple(np.shape(tensors[name])) != tuple(expected[name]))
        before = sections.get("before", {})
        wrong += sorted(name for name in before
                        if name not in expected or tuple(np.shape(before[name])) != tuple(expected[name]))
        if missing or extra or wrong:
            problems.append(f"its tensors do not fit the bundle (missing {missing[:3]}, unknown {extra[:3]}, "
                            f"wrong shape {wrong[:3]})")
    return problems


def meta_problems(meta: Any) -> list[str]:
    """What is wrong with a state's metadata json (empty list = fine)."""
    if not isinstance(meta, dict):
        return ["its metadata is not a JSON object"]
    if meta.get("format") != STATE_FORMAT:
        return [f"its format {meta.get('format')!r} is not {STATE_FORMAT} (written by another version of "
                "edge-agent)"]
    if meta.get("checksum") != json_checksum(meta):
        return ["its metadata checksum does not match (the json was changed or corrupted)"]
    kinds: dict[str, type | tuple[type, ...]] = {
        "agent_id": str, "run_id": str, "round_id": int, "bundle_sha": str, "bundle_dir": str, "backbone": str,
        "labels": list, "metrics": dict, "saved_unix": (int, float), "tensor_file": str, "tensor_sha256": str,
        "tensor_bytes": int}
    bad = [key for key, kind in kinds.items() if not isinstance(meta.get(key), kind)]
    if bad:
        return [f"its metadata lacks or mistypes {bad}"]
    if not _TENSOR_FILE.fullmatch(meta["tensor_file"]) or not _SHA256.fullmatch(meta["tensor_sha256"]):
        return ["its metadata names an invalid tensor file"]
    return []


def split_sections(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """'tensors/head.weight' -> sections['tensors']['head.weight'] (the inverse of `join_sections`)."""
    sections: dict[str, dict[str, np.ndarray]] = {name: {} for name in _SECTIONS}
    for key, value in flat.items():
        section, sep, name = key.partition("/")
        if not sep or section not in sections or not name:
            raise ValueError(f"unexpected entry '{key[:80]}'")
        sections[section][name] = value
    return sections


def join_sections(model: DeviceModel) -> dict[str, np.ndarray]:
    return {f"{section}/{name}": np.ascontiguousarray(value)
            for section, named in (("tensors", model.tensors), ("received", model.received),
                                   ("optimizer", model.optimizer), ("before", model.before))
            for name, value in named.items()}


# --- thin I/O ------------------------------------------------------------------------------------------------


def default_state_dir(data: Path, agent_id: str) -> Path:
    """Beside the agent's data file, one directory per agent id (two agents sharing a data dir stay apart)."""
    return Path(data).resolve().parent / "heterotune-state" / agent_id


def slot_dir(state_dir: Path, run_id: str, bundle_sha: str) -> Path:
    return Path(state_dir) / safe_dir_name(run_id) / safe_dir_name(bundle_sha)


def save_model(state_dir: Path, model: DeviceModel) -> Path:
    """Write ``model`` atomically as the newest state of its (run, bundle); the previous good state is kept as
    ``model.prev.json``. Returns the state's directory. Refuses (DeviceStateError) a model that would not load
    back: no tensors, NaN/inf values, implausible sizes."""
    from safetensors.numpy import save

    sections = {"tensors": model.tensors, "received": model.received, "optimizer": model.optimizer,
                "before": model.before}
    problems = tensor_problems(sections)
    if problems:
        raise DeviceStateError(f"not saving the state of round {model.round_id}: {'; '.join(problems)}")
    slot = slot_dir(state_dir, model.run_id, model.bundle_sha)
    slot.mkdir(parents=True, exist_ok=True)
    blob = save(join_sections(model))
    digest = hashlib.sha256(blob).hexdigest()
    tensor_file = f"tensors-{digest[:16]}.safetensors"
    if not (slot / tensor_file).exists() or _sha256_file(slot / tensor_file) != digest:
        write_atomic(slot / tensor_file, blob)
    meta: dict[str, Any] = {
        "format": STATE_FORMAT, "agent_id": model.agent_id, "run_id": model.run_id, "round_id": int(model.round_id),
        "bundle_sha": model.bundle_sha, "bundle_dir": str(model.bundle_dir), "backbone": model.backbone,
        "labels": list(model.labels), "metrics": clean_metrics(model.metrics), "saved_unix": float(model.saved_unix),
        "tensor_file": tensor_file, "tensor_sha256": digest, "tensor_bytes": len(blob),
    }
    meta["checksum"] = json_checksum(meta)
    current = slot / CURRENT
    if current.exists():
        try:
            _load_copy(slot, CURRENT, model.run_id, model.bundle_sha, None)
        except DeviceStateError as exc:  # never let a bad newest copy push out the good previous one
            log.warning("state %s was not usable (%s); keeping the previous copy", current, exc)
        else:
            os.replace(current, slot / PREVIOUS)
    write_atomic(current, json.dumps(meta, indent=1, sort_keys=True).encode())
    _remove_unreferenced(slot)
    return slot


def _remove_unreferenced(slot: Path) -> None:
    """Tensor files neither json names, and temp files a crash left behind."""
    keep = set()
    for name in (CURRENT, PREVIOUS):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            keep.add(json.loads((slot / name).read_text()).get("tensor_file"))
    for path in slot.iterdir():
        if (path.name.startswith(".tmp-") or _TENSOR_FILE.fullmatch(path.name)) and path.name not in keep:
            with contextlib.suppress(OSError):
                path.unlink()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeviceStateError(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DeviceStateError(f"{path.name} is not readable JSON ({exc})") from None
    problems = meta_problems(meta)
    if problems:
        raise DeviceStateError(f"{path.name}: {'; '.join(problems)}")
    return dict(meta)


def _load_copy(slot: Path, json_name: str, run_id: str | None, bundle_sha: str | None,
               expected: Mapping[str, tuple[int, ...]] | None) -> DeviceModel:
    """One copy (current or previous), fully verified, or a DeviceStateError saying what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    meta = _read_meta(slot / json_name)
    if run_id is not None and meta["run_id"] != run_id:
        raise DeviceStateError(f"{json_name} belongs to run {meta['run_id']!r}, not {run_id!r}")
    if bundle_sha is not None and meta["bundle_sha"] != bundle_sha:
        raise DeviceStateError(f"{json_name} was trained with bundle {meta['bundle_sha'][:12]}, not "
                               f"{bundle_sha[:12]}")
    tensor_path = slot / meta["tensor_file"]
    try:
        size = tensor_path.stat().st_size
        if size != meta["tensor_bytes"]:  # checked before reading: a damaged file may be of any size
            raise DeviceStateError(f"{tensor_path.name} has {size} bytes, not {meta['tensor_bytes']} (truncated or "
                                   "corrupted)")
        blob = tensor_path.read_bytes()
    except OSError as exc:
        raise DeviceStateError(f"{tensor_path.name} is not readable ({exc})") from None
    if hashlib.sha256(blob).hexdigest() != meta["tensor_sha256"]:
        raise DeviceStateError(f"{tensor_path.name} does not match its sha256 ({len(blob)} bytes; truncated or "
                               "corrupted)")
    try:
        sections = split_sections(load(blob))
    except (SafetensorError, ValueError) as exc:
        raise DeviceStateError(f"{tensor_path.name} is not a state tensor file ({exc})") from None
    problems = tensor_problems(sections, expected)
    if problems:
        raise DeviceStateError(f"{tensor_path.name}: {'; '.join(problems)}")
    return DeviceModel(agent_id=meta["agent_id"], run_id=meta["run_id"], round_id=meta["round_id"],
                       bundle_sha=meta["bundle_sha"], bundle_dir=Path(meta["bundle_dir"]), backbone=meta["backbone"],
                       labels=tuple(str(label) for label in meta["labels"]), tensors=sections["tensors"],
                       received=sections["received"], optimizer=sections["optimizer"],
                       metrics=clean_metrics(meta["metrics"]), saved_unix=float(meta["saved_unix"]),
                       before=sections["before"])


def _slots(state_dir: Path) -> list[Path]:
    root = Path(state_dir)
    if not root.is_dir():
        return []
    return [slot for run in root.iterdir() if run.is_dir() for slot in run.iterdir()
            if slot.is_dir() and ((slot / CURRENT).exists() or (slot / PREVIOUS).exists())]


def _slot_time(slot: Path) -> float:
    """When a slot was last saved: from its json when readable, else the files' mtime (a corrupt json)."""
    for name in (CURRENT, PREVIOUS):
        with contextlib.suppress(DeviceStateError):
            return float(_read_meta(slot / name)["saved_unix"])
    return max((path.stat().st_mtime for path in slot.iterdir()), default=0.0)


def load_slot(slot: Path, run_id: str | None = None, bundle_sha: str | None = None,
              expected: Mapping[str, tuple[int, ...]] | None = None) -> DeviceModel:
    """The newest copy in ``slot`` that verifies; a warning when it had to fall back to the previous one."""
    try:
        return _load_copy(slot, CURRENT, run_id, bundle_sha, expected)
    except DeviceStateError as newest:
        try:
            model = _load_copy(slot, PREVIOUS, run_id, bundle_sha, expected)
        except DeviceStateError as previous:
            raise DeviceStateError(
                f"no usable device state in {slot}: newest copy: {newest}; previous copy: {previous}. Delete the "
                "directory to start this run from the received global tensors") from None
        log.warning("device state %s: newest copy unusable (%s); using the previous good copy (round %d)", slot,
                    newest, model.round_id)
        return model


def load_model(state_dir: Path, run_id: str | None = None, *, bundle_sha: str | None = None,
               expected: Mapping[str, tuple[int, ...]] | None = None) -> DeviceModel:
    """The saved model of ``run_id`` (None: the most recently saved run) for ``bundle_sha`` (None: any).

    A corrupt or truncated newest copy -> a warning and the previous good copy; neither usable ->
    DeviceStateError. A state for another bundle is never returned when a bundle is asked for: NoDeviceState
    says it exists and is kept apart. ``expected`` (the bundle's trainable names and shapes) refuses a state
    that would not fit the graph.
    """
    slots = _slots(state_dir)
    if run_id is not None:
        slots = [slot for slot in slots if slot.parent.name == safe_dir_name(run_id)]
    if not slots:
        where = f"for run {run_id!r} " if run_id is not None else ""
        others = sorted({slot.parent.name for slot in _slots(state_dir)})
        kept = f"; the states of other runs ({', '.join(others[:5])}) are kept apart, not loaded" if others else ""
        raise NoDeviceState(f"no device state {where}in {state_dir}: the agent writes one after every completed "
                            f"round (`edge-agent join --state-dir`){kept}")
    if bundle_sha is not None:
        matching = [slot for slot in slots if slot.name == safe_dir_name(bundle_sha)]
        if not matching:
            others = sorted({slot.name for slot in slots})
            raise NoDeviceState(f"the device state in {state_dir} {'for run ' + repr(run_id) + ' ' if run_id else ''}"
                                f"was trained with bundle(s) {others}, not {bundle_sha[:16]}; it is kept apart and "
                                "not loaded into this graph")
        slots = matching
    newest = max(slots, key=_slot_time)
    return load_slot(newest, run_id, bundle_sha, expected)


def list_models(state_dir: Path) -> list[StateSummary]:
    """Every saved state under ``state_dir``, newest first, each verified (``usable``/``problem`` say how)."""
    summaries = []
    for slot in _slots(state_dir):
        problem = None
        try:
            model = _load_copy(slot, CURRENT, None, None, None)
        except DeviceStateError as exc:
            problem = str(exc)
            try:
                model = _load_copy(slot, PREVIOUS, None, None, None)
            except DeviceStateError:
                summaries.append(StateSummary(slot, "?", slot.parent.name, -1, slot.name, "?", _slot_time(slot), {},
                                              False, problem))
                continue
        summaries.append(StateSummary(slot, model.agent_id, model.run_id, model.round_id, model.bundle_sha,
                                      model.backbone, model.saved_unix, model.metrics, True, problem))
    return sorted(summaries, key=lambda s: s.saved_unix, reverse=True)
