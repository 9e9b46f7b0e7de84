"""A new run never lands in an old run's directory: the engine continues from a store's last committed round, so
a second run there used to skip every round and report the first run's metrics as its own (a re-run of
bench.memory_prediction printed the previous run's peaks that way). `coordinator run` refuses with what to do;
`coordinator demo`, which is meant to be run again, moves the previous run aside and keeps it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.aggregation import FederatedState
from coordinator.cli import app
from coordinator.config import RunConfig
from coordinator.runner import RunDirectoryInUse, run_federation, set_aside, stored_run
from coordinator.store import STORE_FILE, RunStore

REPO = Path(__file__).parent.parent


def hold_a_run(run_dir: Path, run_id: str = "run-1", rounds: int = 2) -> None:
    store = RunStore(run_dir)
    try:
        store.set_meta("run_id", run_id)
        for round_id in range(1, rounds + 1):
            store.commit_round(round_id, FederatedState(global_tensors={}, group_tensors={}), started=time.time(),
                               selected=0, metrics=[], diagnostics={})
    finally:
        store.close()


def test_a_directory_without_a_store_holds_no_run(tmp_path: Path) -> None:
    assert stored_run(tmp_path / "missing") is None
    assert stored_run(tmp_path) is None
    hold_a_run(tmp_path / "run")
    assert stored_run(tmp_path / "run") == ("run-1", 2)


def test_a_new_run_in_an_old_runs_directory_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    hold_a_run(run_dir)
    before = {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(RunDirectoryInUse, match=r"already holds run run-1 \(rounds committed: 2\); continue it "
                                                r"with `coordinator run --resume"):
        run_federation(RunConfig(backbones=("tiny-3",)), run_dir)
    assert {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    assert stored_run(run_dir) == ("run-1", 2)


def test_coordinator_run_says_what_to_do_and_exits_2(tmp_path: Path) -> None:
    hold_a_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["run", "--config", str(REPO / "configs" / "example.toml"),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "already holds run run-1" in result.output and "--resume" in result.output


def test_the_demo_moves_a_previous_run_aside_and_keeps_it(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    hold_a_run(out)
    (out / "metrics.csv").write_text("round\n1\n")
    moved = set_aside(out)
    assert moved == tmp_path / "demo-run-1" and not out.exists()
    assert stored_run(moved) == ("run-1", 2) and (moved / "metrics.csv").read_text() == "round\n1\n"
    assert set_aside(out) is None  # nothing left to move
    hold_a_run(out)  # the same run id again: the first copy is not overwritten
    second = set_aside(out)
    assert second is not None and second != moved and (moved / STORE_FILE).exists() and (second / STORE_FILE).exists()
