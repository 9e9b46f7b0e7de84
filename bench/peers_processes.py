"""Processes of the peers benchmark: a peak-RSS sampler over process trees and the Flower launch environment.

Why a sampler and not only each process's own VmHWM: Flower starts processes we never see (a SuperExec per
SuperNode, one `flwr-clientapp` per message, Ray's daemons), so the device's footprint is the whole tree under
the process we started. Every process the sampler saw is remembered by PID, so leftovers can be ended by PID.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.common import python_env

FLOWER_VENV_ENV = "HETEROTUNE_FLOWER_VENV"  # where bench/peers.py finds the Flower venv unless --flower-venv


@dataclass
class TreeSampler:
    """Every ``interval_s``: the RSS of each process under each root (roots from ``roots()``), keeping per
    process its peak and per root the peak of the tree's sum. Kinds come from ``classify(cmdline)``."""

    roots: Callable[[], dict[str, int]]
    classify: Callable[[str], str]
    interval_s: float = 0.2
    peak_by_pid: dict[int, float] = field(default_factory=dict)
    kind_by_pid: dict[int, str] = field(default_factory=dict)
    root_by_pid: dict[int, str] = field(default_factory=dict)
    tree_peak: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a process may vanish between listing and reading
                self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        for name, pid in self.roots().items():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0.0
            for proc in procs:
                try:
                    rss = proc.memory_info().rss / 2**20
                    if self.kind_by_pid.get(proc.pid, "other") == "other":  # a Ray worker renames itself later
                        self.kind_by_pid[proc.pid] = self.classify(" ".join(proc.cmdline()))
                        self.root_by_pid[proc.pid] = name
                except psutil.Error:
                    continue
                total += rss
                self.peak_by_pid[proc.pid] = max(self.peak_by_pid.get(proc.pid, 0.0), rss)
            self.tree_peak[name] = max(self.tree_peak.get(name, 0.0), total)

    def peaks(self, kind: str) -> dict[str, float]:
        """Per root: the largest peak of any one process of ``kind`` in its tree."""
        out: dict[str, float] = {}
        for pid, peak in self.peak_by_pid.items():
            if self.kind_by_pid.get(pid) == kind:
                root = self.root_by_pid[pid]
                out[root] = max(out.get(root, 0.0), peak)
        return out

    def seen(self) -> list[int]:
        return sorted(self.peak_by_pid)


def end_leftovers(pids: Iterable[int], grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, whichever of these PIDs (all seen under our own processes) still runs."""
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                proc.terminate()
                alive.append(proc)
        except psutil.Error:
            continue
    _gone, still = psutil.wait_procs(alive, timeout=grace_s)
    for proc in still:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [p.pid for p in alive]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listener_pid(port: int) -> int | None:
    """The PID listening on 127.0.0.1:``port`` (the detached local SuperLink of `flwr run` in simulation)."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


def flower_env(venv: Path, home: Path) -> dict[str, str]:
    """Offline, loopback-only, single-thread environment for every Flower process (reference measurements:
    telemetry and the update check call home, the SuperLink would `uv sync` dependencies, Ray would bind the
    VM's address and probe the cloud metadata service without these)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    env = python_env(threads=1)
    env.update({
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(home / "flwr"),
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "HOME": str(home),
        "HF_HOME": str(home / "hf"),
    })
    return env


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")
