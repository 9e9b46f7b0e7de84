"""Helpers every benchmark part shares: process memory and CPU, stopping children, machine facts, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "runs" / "bench"
PAGE_MB = 1024 * 1024


def status_mb(field: str, pid: int | str = "self") -> float:
    """A memory line of /proc/PID/status in MB (VmRSS = now, VmHWM = peak since exec); 0.0 if gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM: starts afresh at exec, unlike ru_maxrss, which a child inherits from its parent on Linux."""
    return status_mb("VmHWM", pid)


def rss_mb(pid: int | str = "self") -> float:
    return status_mb("VmRSS", pid)


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of one process (utime + stime from /proc/PID/stat); 0.0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> int | None:
    """Wait up to ``grace_s`` for a child to exit, then SIGTERM, then SIGKILL it (by its PID only)."""
    try:
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        return proc.wait(5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5.0)


def python_env(threads: int | None = 1) -> dict[str, str]:
    """Environment for a benchmark child: the repository importable, offline, BLAS threads pinned."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update({"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                    "MKL_NUM_THREADS": str(threads)})
    return env


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded: pages print them beside wall times (a busy machine)."""
    return [round(x, 2) for x in os.getloadavg()]


def git_commit(repo: Path = REPO) -> str:
    """The checked-out commit, read from .git without running git (the lead owns the repository).

    In a linked worktree (``git worktree add``, how a long sweep runs beside ongoing work) ``.git`` is a file
    naming the worktree's own git directory, which holds HEAD; branch refs live in the shared ``commondir``.
    """
    git = repo / ".git"
    try:
        common = git
        if git.is_file():
            git = (repo / git.read_text().strip().removeprefix("gitdir:").strip()).resolve()
            common_file = git / "commondir"
            common = (git / common_file.read_text().strip()).resolve() if common_file.exists() else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        ref_file = common / ref
        if ref_file.exists():
            return ref_file.read_text().strip()[:12]
        packed = common / "packed-refs"
        for line in packed.read_text().splitlines() if packed.exists() else []:
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def mosquitto_version() -> str:
    from coordinator.broker import find_mosquitto

    try:
        out = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = (out.stdout or out.stderr).splitlines()
    return first[0].replace("mosquitto version ", "") if first else "unknown"


def machine_facts() -> dict[str, Any]:
    import psutil

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": load_average(),
        "fd_limit": _fd_limit(),
        "versions": {name: _version(name) for name in
                     ("onnxruntime-training-cpu", "torch", "transformers", "paho-mqtt", "numpy")}
                    | {"mosquitto": mosquitto_version()},
    }


def _fd_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else float("nan")


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    """A number for a table cell; '–' when missing."""
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
