"""The device state file: atomic saves that keep the previous good copy, verified loads with a fallback, and
states of another run or bundle never returned for the wrong one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from edge_agent.device_state import (
    CURRENT,
    PREVIOUS,
    DeviceModel,
    DeviceStateError,
    NoDeviceState,
    default_state_dir,
    json_checksum,
    list_models,
    load_model,
    save_model,
    slot_dir,
)

BUNDLE_A = "a" * 64
BUNDLE_B = "b" * 64
SHAPES = {"head.weight": (3, 8), "head.bias": (3,), "slot0.w_in.weight": (4, 8)}


def _model(round_id: int, *, run_id: str = "run-1", bundle_sha: str = BUNDLE_A, seed: int | None = None,
           saved_unix: float = 1000.0) -> DeviceModel:
    rng = np.random.default_rng(round_id if seed is None else seed)
    tensors = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
    return DeviceModel(agent_id="dev-1", run_id=run_id, round_id=round_id, bundle_sha=bundle_sha,
                       bundle_dir=Path("/cache/bundles") / bundle_sha, backbone="minilm-l3", labels=("a", "b", "c"),
                       tensors=tensors, received={"slot0.w_in.weight": tensors["slot0.w_in.weight"] * 0.5},
                       optimizer={}, metrics={"personal_accuracy": 0.5 + round_id / 100, "global_accuracy": None,
                                              "n_train": 30, "n_test": 10, "train_loss": float("nan"),
                                              "backend": "ort"},
                       saved_unix=saved_unix + round_id, before={"head.bias": tensors["head.bias"] - 1})


def _same(a: DeviceModel, b: DeviceModel) -> bool:
    return (a.round_id == b.round_id and a.tensors.keys() == b.tensors.keys()
            and all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
            and a.received.keys() == b.received.keys()
            and all(np.array_equal(a.received[k], b.received[k]) for k in a.received)
            and a.before.keys() == b.before.keys()
            and all(np.array_equal(a.before[k], b.before[k]) for k in a.before))


def _tensor_file(slot: Path, json_name: str = CURRENT) -> Path:
    return slot / json.loads((slot / json_name).read_text())["tensor_file"]


def test_round_trip_keeps_every_tensor_and_metadata(tmp_path: Path) -> None:
    model = _model(3)
    slot = save_model(tmp_path, model)
    loaded = load_model(tmp_path)
    assert _same(loaded, model)
    assert (loaded.run_id, loaded.bundle_sha, loaded.backbone, loaded.labels) == ("run-1", BUNDLE_A, "minilm-l3",
                                                                                  ("a", "b", "c"))
    assert loaded.bundle_dir == model.bundle_dir and loaded.saved_unix == model.saved_unix
    assert loaded.metrics["personal_accuracy"] == pytest.approx(0.53)
    assert loaded.metrics["train_loss"] is None  # NaN is stored as "unknown", never as a number
    assert slot == slot_dir(tmp_path, "run-1", BUNDLE_A)
    assert load_model(tmp_path, "run-1", bundle_sha=BUNDLE_A, expected=SHAPES).round_id == 3


def test_second_save_keeps_the_first_as_previous_and_removes_older_files(tmp_path: Path) -> None:
    for round_id in range(4):
        slot = save_model(tmp_path, _model(round_id))
    assert json.loads((slot / CURRENT).read_text())["round_id"] == 3
    assert json.loads((slot / PREVIOUS).read_text())["round_id"] == 2
    assert len(list(slot.glob("tensors-*.safetensors"))) == 2  # rounds 0 and 1 are gone


def test_crash_between_temp_write_and_rename_leaves_the_previous_good_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_model(tmp_path, _model(1))
    real_replace = os.replace

    def crash_on_commit(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith(CURRENT) and Path(src).name.endswith(".part"):  # protocols/durable.py temp files
            raise KeyboardInterrupt("power cut")  # the new json is written and fsynced, but never renamed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_commit)
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path, _model(2))
    monkeypatch.setattr(os, "replace", real_replace)
    assert _same(load_model(tmp_path, "run-1", bundle_sha=BUNDLE_A), _model(1))
    slot = slot_dir(tmp_path, "run-1", BUNDLE_A)
    assert not list(slot.glob(".tmp-*"))  # the failed write cleaned its temp file
    save_model(tmp_path, _model(3))  # the next save works and sweeps the orphaned tensor file of round 2
    assert load_model(tmp_path).round_id == 3
    assert len(list(slot.glob("tensors-*.safetensors"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete", "json"])
def test_damaged_newest_copy_falls_back_to_the_previous_with_a_warning(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    save_model(tmp_path, _model(1))
    slot = save_model(tmp_path, _model(2))
    newest = _tensor_file(slot)
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "bitflip":
        data[-5] ^= 0x10  # inside the last tensor's values: the file still parses, only its hash tells
        newest.write_bytes(bytes(data))
    elif damage == "delete":
        newest.unlink()
    else:
        meta = json.loads((slot / CURRENT).read_text())
        meta["round_id"] = 7  # a flipped digit in the json
        (slot / CURRENT).write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="edge_agent.device_state"):
        loaded = load_model(tmp_path, "run-1", bundle_sha=BUNDLE_A)
    assert _same(loaded, _model(1))
    assert any("previous good copy" in record.getMessage() for record in caplog.records)
    # The next save does not push the good previous copy out in favour of the damaged one.
    save_model(tmp_path, _model(3))
    assert json.loads((slot / PREVIOUS).read_text())["round_id"] == 1
    assert load_model(tmp_path).round_id == 3


def test_both_copies_damaged_is_a_clear_error(tmp_path: Path) -> None:
    save_model(tmp_path, _model(1))
    slot = save_model(tmp_path, _model(2))
    for name in (CURRENT, PREVIOUS):
        path = _tensor_file(slot, name)
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DeviceStateError, match=r"no usable device state.*truncated or corrupted.*Delete"):
        load_model(tmp_path, "run-1")
    [summary] = list_models(tmp_path)
    assert not summary.usable and summary.problem


def test_nan_tensors_are_never_saved_nor_loaded(tmp_path: Path) -> None:
    model = _model(1)
    poisoned = dict(model.tensors, **{"head.bias": np.array([0.0, np.nan, 1.0], np.float32)})
    with pytest.raises(DeviceStateError, match=r"head\.bias.*NaN"):
        save_model(tmp_path, dataclasses.replace(model, tensors=poisoned))
    assert not list_models(tmp_path)
    # Written by something else (hash consistent, values not): loading refuses it too.
    save_model(tmp_path, _model(0))
    slot = save_model(tmp_path, model)
    meta = json.loads((slot / CURRENT).read_text())
    blob = save({f"tensors/{k}": v for k, v in poisoned.items()})
    _tensor_file(slot).write_bytes(blob)
    meta["tensor_sha256"] = hashlib.sha256(blob).hexdigest()
    meta["checksum"] = json_checksum(meta)
    (slot / CURRENT).write_text(json.dumps(meta))
    assert load_model(tmp_path).round_id == 0  # the NaN copy is refused, the previous one is used


def test_foreign_bundle_or_run_is_kept_apart(tmp_path: Path) -> None:
    save_model(tmp_path, _model(2, bundle_sha=BUNDLE_B))
    with pytest.raises(NoDeviceState, match="kept apart"):
        load_model(tmp_path, "run-1", bundle_sha=BUNDLE_A)
    with pytest.raises(NoDeviceState, match=r"other runs \(run-1\) are kept apart"):
        load_model(tmp_path, "run-2", bundle_sha=BUNDLE_B)
    save_model(tmp_path, _model(1, bundle_sha=BUNDLE_A, saved_unix=0.0))
    assert load_model(tmp_path, "run-1", bundle_sha=BUNDLE_A).bundle_sha == BUNDLE_A
    assert load_model(tmp_path, "run-1").bundle_sha == BUNDLE_B  # no bundle asked: the most recent save
    # A state copied into another run's directory still names its own run: it is not returned for that run.
    shutil.copytree(slot_dir(tmp_path, "run-1", BUNDLE_A), slot_dir(tmp_path, "run-3", BUNDLE_A))
    with pytest.raises(DeviceStateError, match="belongs to run 'run-1'"):
        load_model(tmp_path, "run-3", bundle_sha=BUNDLE_A)


def test_state_that_does_not_fit_the_bundle_graph_is_refused(tmp_path: Path) -> None:
    save_model(tmp_path, _model(1))
    with pytest.raises(DeviceStateError, match="do not fit the bundle"):
        load_model(tmp_path, expected={**SHAPES, "head.weight": (5, 8)})
    odd = dataclasses.replace(_model(2), before={"head.bias": np.zeros(4, np.float32)})
    save_model(tmp_path / "odd", odd)
    with pytest.raises(DeviceStateError, match="do not fit the bundle"):  # the pre-round head is checked too
        load_model(tmp_path / "odd", expected=SHAPES)


def test_most_recent_run_is_the_default_and_list_models_reports_all(tmp_path: Path) -> None:
    save_model(tmp_path, _model(4, run_id="old", saved_unix=100.0))
    save_model(tmp_path, _model(1, run_id="new", saved_unix=5000.0))
    assert load_model(tmp_path).run_id == "new"
    assert load_model(tmp_path, "old").round_id == 4
    summaries = list_models(tmp_path)
    assert [s.run_id for s in summaries] == ["new", "old"] and all(s.usable for s in summaries)
    assert summaries[1].metrics["n_train"] == 30 and summaries[1].backbone == "minilm-l3"


def test_hostile_run_ids_stay_inside_the_state_dir(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    slot = save_model(state_dir, _model(1, run_id="../../escape"))
    assert state_dir.resolve() in slot.resolve().parents
    assert load_model(state_dir, "../../escape").run_id == "../../escape"
    assert not (tmp_path / "escape").exists()


def test_default_state_dir_is_beside_the_data_per_agent(tmp_path: Path) -> None:
    data = tmp_path / "data" / "dev.jsonl"
    assert default_state_dir(data, "dev-1") == (tmp_path / "data" / "heterotune-state" / "dev-1").resolve()
    assert default_state_dir(data, "dev-1") != default_state_dir(data, "dev-2")


def test_missing_state_dir_is_no_state(tmp_path: Path) -> None:
    with pytest.raises(NoDeviceState, match="no device state"):
        load_model(tmp_path / "nothing")
    assert list_models(tmp_path / "nothing") == []


def test_demo_names_each_device_model_and_a_command_to_try_it(tmp_path: Path) -> None:
    from coordinator.demo import agent_command, device_state_dir, model_locations
    from coordinator.fleet import EmulatedAgent

    assert model_locations(tmp_path, ["pi4-a"]) == []  # nothing trained, nothing claimed
    save_model(device_state_dir(tmp_path, "pi4-a"), _model(1))
    save_model(device_state_dir(tmp_path, "orin-a"), _model(1))
    lines = model_locations(tmp_path, ["pi4-a", "orin-a", "refused-1"])
    assert f"  orin-a: {tmp_path / 'devices' / 'orin-a'}" in lines and "refused-1" not in "\n".join(lines)
    assert lines[-1].startswith(f"try one: edge-agent predict --state-dir {tmp_path / 'devices' / 'orin-a'} --text ")
    command = agent_command(EmulatedAgent("pi4-a", 384), "127.0.0.1", 1883, Path("d.jsonl"), Path("g.jsonl"),
                            Path("cache"), state_dir=device_state_dir(tmp_path, "pi4-a"))
    assert command[command.index("--state-dir") + 1] == str(tmp_path / "devices" / "pi4-a")
