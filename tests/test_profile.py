"""Device profiling: measured fields, user caps, backend detection without importing torch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pytest

from edge_agent.profile import (
    KNOWN_BACKENDS,
    PROFILE_FIELDS,
    available_backends,
    format_profile_table,
    measure_gflops,
    profile_device,
)

REPO = Path(__file__).resolve().parents[1]


def test_measure_gflops_is_positive_and_plausible() -> None:
    g = measure_gflops(size=128, repeats=3)
    assert 0.1 < g < 1e5
    with pytest.raises(ValueError, match="size and repeats"):
        measure_gflops(size=0)


def test_profile_fields_and_sanity(tmp_path: Path) -> None:
    p = profile_device(disk_path=tmp_path)
    assert tuple(p) == PROFILE_FIELDS
    assert isinstance(p["ram_total_mb"], float) and p["ram_total_mb"] > 0
    assert isinstance(p["ram_available_mb"], float) and 0 < p["ram_available_mb"] <= p["ram_total_mb"]
    assert p["ram_total_mb"] == pytest.approx(psutil.virtual_memory().total / 2**20)
    assert isinstance(p["cores"], int) and 1 <= p["cores"] <= (os.cpu_count() or 1)
    assert isinstance(p["arch"], str) and p["arch"] and p["arch"] != "amd64"
    assert isinstance(p["gflops"], float) and p["gflops"] > 0.1
    assert isinstance(p["disk_free_mb"], float) and p["disk_free_mb"] > 0
    assert p["backends"] == available_backends()
    assert p["max_memory_mb"] is None and p["max_round_seconds"] is None
    # no backend asked for: what the agent's "auto" resolves to, the first available one
    assert p["backend"] == (p["backends"][0] if p["backends"] else None)
    assert profile_device(disk_path=tmp_path, backend="torch")["backend"] == "torch"
    with pytest.raises(ValueError, match="unknown trainer backend"):
        profile_device(disk_path=tmp_path, backend="tensorflow")


def test_caps_are_reflected_and_validated(tmp_path: Path) -> None:
    p = profile_device(max_memory_mb=512, max_round_seconds=30.5, disk_path=tmp_path / "not" / "yet")
    assert p["max_memory_mb"] == 512.0 and p["max_round_seconds"] == 30.5
    assert isinstance(p["disk_free_mb"], float) and p["disk_free_mb"] > 0  # nearest existing parent
    with pytest.raises(ValueError, match="max_memory_mb must be a positive number"):
        profile_device(max_memory_mb=0)
    with pytest.raises(ValueError, match="max_round_seconds"):
        profile_device(max_round_seconds=-1)


def test_profile_validates_against_protocol_model() -> None:
    from protocols.messages import DeviceProfile

    p = profile_device(max_memory_mb=900)
    assert set(DeviceProfile.model_fields) == set(PROFILE_FIELDS)
    model = DeviceProfile.model_validate(p)
    assert model.max_memory_mb == 900


def test_available_backends_reports_known_names() -> None:
    found = available_backends()
    assert isinstance(found, list) and len(found) == len(set(found))
    assert set(found) <= set(KNOWN_BACKENDS)
    assert ("torch" in found) == (importlib.util.find_spec("torch") is not None)


def test_ort_detection_follows_the_shim(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("edge_agent.ort_api")

    def ok() -> types.ModuleType:
        return types.ModuleType("api")

    def broken() -> types.ModuleType:
        raise ImportError("no training build")

    fake.load_training_api = ok  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edge_agent.ort_api", fake)
    assert available_backends()[0] == "ort"
    fake.load_training_api = broken  # type: ignore[attr-defined]
    assert "ort" not in available_backends()
    monkeypatch.setitem(sys.modules, "edge_agent.ort_api", None)  # module missing -> ImportError
    assert "ort" not in available_backends()


def test_on_a_torch_free_device_detection_imports_no_torch() -> None:
    """Simulate a device: block torch/transformers/onnx imports, then detect backends in a fresh process."""
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'transformers', 'onnx'}:\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edge_agent.profile import available_backends\n"
        "print(available_backends())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'onnx'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    backends, heavy = out.stdout.strip().splitlines()
    ort_installed = importlib.util.find_spec("onnxruntime") is not None
    assert backends == ("['ort']" if ort_installed else "[]")
    assert heavy == "[]"


def test_format_profile_table() -> None:
    profile: dict[str, object] = {
        "ram_total_mb": 4096.0,
        "ram_available_mb": 2048.5,
        "cores": 4,
        "arch": "aarch64",
        "gflops": 12.34,
        "disk_free_mb": 10_000.0,
        "backends": ["torch"],
        "max_memory_mb": None,
        "max_round_seconds": 60.0,
        "backend": "torch",
    }
    table = format_profile_table(profile)
    lines = table.splitlines()
    assert len(lines) == len(PROFILE_FIELDS)
    assert "RAM total" in lines[0] and "4,096.0 MB" in lines[0]
    assert "12.3 GFLOP/s" in table and "aarch64" in table and "torch" in table
    assert "no cap" in table and "60.0 s" in table
    assert lines[-1].split() == ["trains", "with", "torch"]
    assert "none" in format_profile_table({"backends": []})
