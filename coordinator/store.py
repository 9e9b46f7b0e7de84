"""The coordinator's durable state: SQLite for agents, rounds and metrics; safetensors for each round's tensors.

A round is committed by first writing its tensors to a temporary file and renaming it into place, then
recording the round in one SQLite transaction; a crash between the two leaves an orphan file, never a round
that claims tensors it does not have.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save

from coordinator.aggregation import FederatedState
from protocols.durable import write_atomic

STORE_FILE = "coordinator.sqlite"  # a run directory holds a run exactly when this file is in it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY, backbone TEXT, status TEXT NOT NULL, profile TEXT NOT NULL,
    explanation TEXT NOT NULL, n_train INTEGER NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY, started REAL NOT NULL, finished REAL NOT NULL, selected INTEGER NOT NULL,
    accepted INTEGER NOT NULL, tensors_file TEXT NOT NULL, diagnostics TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    round_id INTEGER NOT NULL, agent_id TEXT NOT NULL, backbone TEXT NOT NULL,
    personal_accuracy REAL, global_accuracy REAL, n_test INTEGER, n_global_test INTEGER, n_train INTEGER,
    train_loss REAL, bytes_up INTEGER, bytes_down INTEGER, train_seconds REAL, eval_seconds REAL,
    peak_rss_mb REAL, backend TEXT, accepted INTEGER NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (round_id, agent_id));
"""


@dataclass(frozen=True)
class MetricRow:
    round: int
    agent_id: str
    backbone: str
    personal_accuracy: float | None
    global_accuracy: float | None
    n_test: int
    n_global_test: int
    n_train: int
    train_loss: float | None
    bytes_up: int
    bytes_down: int
    train_seconds: float
    eval_seconds: float
    peak_rss_mb: float
    backend: str
    accepted: bool
    reason: str = ""


def metric_row(row: Sequence[Any]) -> MetricRow:
    """One row of the metrics table (``SELECT *``) as a MetricRow; SQLite keeps the accepted flag as 0/1."""
    values = dict(zip((f.name for f in fields(MetricRow)), row, strict=True))
    return MetricRow(**{**values, "accepted": bool(values["accepted"])})

class RunStore:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        (run_dir / "tensors").mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(run_dir / STORE_FILE, isolation_level=None)
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO run VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM run WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def upsert_agent(self, agent_id: str, backbone: str | None, status: str, profile: Mapping[str, Any],
                     explanation: str, n_train: int = 0) -> None:
        self.db.execute("INSERT OR REPLACE INTO agents VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (agent_id, backbone, status, json.dumps(dict(profile)), explanation, n_train, time.time()))

    def joined_agents(self) -> list[tuple[str, str, int, dict[str, Any]]]:
        """(agent id, backbone, n_train, profile) of every agent that was admitted to the run."""
        rows = self.db.execute("SELECT agent_id, backbone, n_train, profile FROM agents WHERE status = 'joined' "
                               "ORDER BY agent_id").fetchall()
        return [(a, b, int(n), json.loads(p)) for a, b, n, p in rows]

    def tensors_path(self, round_id: int) -> Path:
        return self.run_dir / "tensors" / f"round-{round_id:04d}.safetensors"

    def commit_round(self, round_id: int, state: FederatedState, *, started: float, selected: int,
                     metrics: list[MetricRow], diagnostics: Mapping[str, Any]) -> Path:
        """Tensors first (atomic rename), then the round and its metrics in one transaction."""
        path = self.save_state(round_id, state)
        self.db.execute("BEGIN")
        try:
            self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (round_id, started, time.time(), selected, sum(m.accepted for m in metrics),
                             path.name, json.dumps(diagnostics, default=_jsonable)))
            self.db.executemany(
                "INSERT OR REPLACE INTO metrics VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [tuple(asdict(m).values()) for m in metrics])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return path

    def save_state(self, round_id: int, state: FederatedState) -> Path:
        path = self.tensors_path(round_id)
        flat = {f"global/{k}": v for k, v in state.global_tensors.items()}
        for group, tensors in state.group_tensors.items():
            flat.update({f"group/{group}/{k}": v for k, v in tensors.items()})
        # asarray(order="C"), not ascontiguousarray: that turns 0-d tensors (fedproto's counts) into shape (1,)
        write_atomic(path, save({k: np.asarray(v, order="C") for k, v in flat.items()},
                                metadata={"groups": json.dumps(sorted(state.group_tensors))}))
        return path

    def save_update(self, round_id: int, agent_id: str, tensors: Mapping[str, np.ndarray]) -> Path:
        """Every accepted update is kept: the audit trail that lets anyone recompute a round's aggregate."""
        folder = self.run_dir / "updates" / f"round-{round_id:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{agent_id}.safetensors"
        write_atomic(path, save({k: np.asarray(v, order="C") for k, v in tensors.items()}))
        return path

    def metrics(self) -> list[MetricRow]:
        return [metric_row(row) for row in self.db.execute("SELECT * FROM metrics ORDER BY round_id, agent_id")]

    def round_diagnostics(self) -> list[dict[str, Any]]:
        """Every committed round's diagnostics, oldest first (the privacy accountant's ledger on resume)."""
        rows = self.db.execute("SELECT diagnostics FROM rounds ORDER BY round_id").fetchall()
        return [json.loads(row[0]) for row in rows]

    def last_round(self) -> int:
        row = self.db.execute("SELECT MAX(round_id) FROM rounds").fetchone()
        return int(row[0]) if row and row[0] is not None else 0


def load_state(path: Path) -> FederatedState:
    """Inverse of RunStore.save_state (also used by tests to recompute aggregates)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        groups = json.loads((handle.metadata() or {}).get("groups", "[]"))
    flat = load_file(str(path))
    state = FederatedState(global_tensors={}, group_tensors={g: {} for g in groups})
    for key, value in flat.items():
        scope, _, rest = key.partition("/")
        if scope == "global":
            state.global_tensors[rest] = value
        else:
            group, _, name = rest.partition("/")
            state.group_tensors.setdefault(group, {})[name] = value
    return state


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    return str(value)
