"""Measure what this device can do, so the coordinator can assign it the largest backbone that fits.

The result has exactly the fields of ``protocols.messages.DeviceProfile`` (docs/design.md, "Profiles and
assignment"). Nothing here imports torch or onnxruntime.training's package ``__init__`` (which imports
torch): backend detection either goes through the import shim in ``edge_agent.ort_api`` or only asks
whether a module could be found.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import psutil

KNOWN_BACKENDS = ("ort", "torch")
PROFILE_FIELDS = (
    "ram_total_mb",
    "ram_available_mb",
    "cores",
    "arch",
    "gflops",
    "disk_free_mb",
    "backends",
    "max_memory_mb",
    "max_round_seconds",
    "backend",
)
_MB = 1024 * 1024
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def measure_gflops(size: int = 384, repeats: int = 15) -> float:
    """Single-precision matmul throughput in GFLOP/s: 2*n^3 / (fastest of ``repeats`` timed runs).

    The fastest run, not the median: a device joining while other processes start up (an emulated
    fleet, a busy Pi) sees scheduler stalls that say nothing about what it can compute, and the median
    of a few millisecond-long runs was seen 80x too low that way. One warm-up run first keeps BLAS
    thread start-up and page faults out of the timing.
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be at least 1, got size={size}, repeats={repeats}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    np.matmul(a, b, out=out)
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    seconds = max(min(times), 1e-9)
    return 2.0 * size**3 / seconds / 1e9


def _ort_available() -> bool:
    """True if the ORT training API loads through the project's torch-free shim."""
    try:
        from edge_agent.ort_api import load_training_api

        load_training_api()
    except (ImportError, OSError):
        # ImportError: package (or the shim module) missing or broken; OSError: native library won't load.
        return False
    return True


def _module_exists(name: str) -> bool:
    """Whether ``name`` could be imported, without importing it (importing torch costs seconds and GBs)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    """Trainer backends usable on this device, in order of preference (subset of KNOWN_BACKENDS)."""
    found: list[str] = []
    if _ort_available():
        found.append("ort")
    if _module_exists("torch"):
        found.append("torch")
    return found


def _arch() -> str:
    """Normalised CPU architecture (``arm64`` and ``aarch64`` are the same instruction set)."""
    machine = platform.machine().lower() or "unknown"
    return _ARCH_ALIASES.get(machine, machine)


def _existing_ancestor(path: Path) -> Path:
    """The path itself or its nearest existing parent: the data dir may not exist before first use."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def _check_cap(name: str, value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be a positive number (or omitted for no cap), got {value}")
    return None if value is None else float(value)


def profile_device(
    *,
    max_memory_mb: float | None = None,
    max_round_seconds: float | None = None,
    disk_path: Path = Path("."),
    backend: str | None = None,
) -> dict[str, object]:
    """Measure the device and attach the user's caps; keys are exactly ``PROFILE_FIELDS``.

    The caps are passed through unchanged: the coordinator applies them (memory <= 0.8 x budget, round
    time <= deadline) and can then explain a refusal in terms of what the user asked for.
    ``backend`` is the trainer backend the agent resolved (`edge_agent.agent.resolve_backend`); without one, the
    backend ``auto`` would pick here (the first available, or None if there is none). The coordinator assigns
    with that backend's cost card, because the backends' peak memory differs.
    """
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(_existing_ancestor(disk_path)))
    backends = available_backends()
    if backend is not None and backend not in KNOWN_BACKENDS:
        raise ValueError(f"unknown trainer backend {backend!r}; known: {', '.join(KNOWN_BACKENDS)}")
    return {
        "ram_total_mb": memory.total / _MB,
        "ram_available_mb": memory.available / _MB,
        "cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        "arch": _arch(),
        "gflops": measure_gflops(),
        "disk_free_mb": disk.free / _MB,
        "backends": backends,
        "max_memory_mb": _check_cap("max_memory_mb", max_memory_mb),
        "max_round_seconds": _check_cap("max_round_seconds", max_round_seconds),
        "backend": backend if backend is not None else (backends[0] if backends else None),
    }


def _format_value(key: str, value: object) -> str:
    if value is None:
        return "no cap" if key.startswith("max_") else "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, float):
        unit = {"gflops": " GFLOP/s", "max_round_seconds": " s"}.get(
            key, " MB" if key.endswith("_mb") else ""
        )
        return f"{value:,.1f}{unit}"
    return str(value)


_LABELS = {
    "ram_total_mb": "RAM total",
    "ram_available_mb": "RAM available",
    "cores": "CPU cores (physical)",
    "arch": "architecture",
    "gflops": "matmul throughput",
    "disk_free_mb": "disk free",
    "backends": "trainer backends",
    "max_memory_mb": "memory cap",
    "max_round_seconds": "round time cap",
    "backend": "trains with",
}


def format_profile_table(profile: Mapping[str, object]) -> str:
    """A plain two-column table for `edge-agent profile` (plain text, so it pastes into issues and logs)."""
    keys = [k for k in PROFILE_FIELDS if k in profile] + [k for k in profile if k not in PROFILE_FIELDS]
    rows = [(_LABELS.get(k, k), _format_value(k, profile[k])) for k in keys]
    width = max(len(name) for name, _ in rows) if rows else 0
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
