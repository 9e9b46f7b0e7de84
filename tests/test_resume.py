"""`coordinator run --resume RUN_DIR`, exactly as documented, after the coordinator was killed with kill -9.

The run's own broker is recorded in RUN_DIR/broker/broker.json. A resume reuses it (still running: adopted; dead:
restarted from the very same, unchanged mosquitto.conf on the same port), finishes the run with the same tensors
as an uninterrupted run, writes a summary.json and metrics.csv that cover every round, and leaves no broker
behind. SIGTERM and Ctrl-C also stop the run's broker; an own broker reachable from other hosts without
passwords is refused unless --insecure.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import mosquitto_pid_running, stop_pid
from coordinator.run_broker import BrokerRecord, load_record
from coordinator.store import load_state
from tests.harness import agent_processes, assert_rounds_follow_the_rule, fleet_data
from tests.test_faults import committed_rounds, wait_for

PINS = {"a1": "tiny-3", "a2": "tiny-3"}
ROUNDS = 3


def coordinator(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "run", *args], stdout=handle,
                                stderr=subprocess.STDOUT)


def write_config(path: Path, local_steps: int = 150) -> Path:
    path.write_text(
        f'run_name = "resume"\nbackbones = ["tiny-3"]\nrounds = {ROUNDS}\nlocal_steps = {local_steps}\n'
        f"min_agents = {len(PINS)}\nround_timeout_s = 120\njoin_timeout_s = 180\nlearning_rate = 0.005\n"
        '[task]\nmax_length = 32\nbatch_size = 8\n[pinned]\n' + "".join(f'{a} = "{b}"\n' for a, b in PINS.items()))
    return path


def recorded_broker(run_dir: Path) -> BrokerRecord:
    wait_for(lambda: (run_dir / "broker" / "broker.json").exists(), 180, "the run's broker to be recorded")
    record = load_record(run_dir / "broker")
    assert record is not None and record.embedded and record.pid is not None and record.config is not None
    return record


def stop_recorded_broker(run_dir: Path) -> None:
    """Never leave a broker behind, even when a test fails before the coordinator stopped it (by its PID, and only
    if that PID still is mosquitto with this run's config)."""
    record = load_record(run_dir / "broker") if (run_dir / "broker" / "broker.json").exists() else None
    if record is not None and record.pid is not None and record.config is not None:
        stop_pid(record.pid, Path(record.config))


def dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def federation(tmp: Path, *, crash: str | None) -> Path:
    """A run on its own broker; with ``crash`` the coordinator (and, for "broker", its broker too) is killed with
    SIGKILL in round 2 and the run is continued with `coordinator run --resume RUN_DIR` and nothing else."""
    data = fleet_data(tmp, list(PINS))
    run_dir, log = tmp / "run", tmp / "coordinator.log"
    with agent_processes(tmp, data) as agents:
        proc = coordinator(["--config", str(write_config(tmp / "run.toml")), "--out", str(run_dir)], log)
        pids: list[int] = []
        try:
            first = recorded_broker(run_dir)
            assert first.host == "127.0.0.1"  # the default own broker is on loopback
            pids.append(first.pid)  # type: ignore[arg-type]
            agents.start(first.host, first.port)
            if crash is not None:
                wait_for(lambda: committed_rounds(run_dir) >= 1, 300, "round 1 to commit")
                time.sleep(0.3)  # round 2 (150 local steps) is under way
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                assert committed_rounds(run_dir) == 1, "the crash did not land mid-round"
                assert first.pid is not None and mosquitto_pid_running(first.pid, Path(first.config or ""))
                if crash == "broker":
                    os.kill(first.pid, signal.SIGKILL)
                    wait_for(lambda: dead(first.pid or 0), 10, "the broker to die")
                config_before = Path(first.config or "").read_bytes()
                proc = coordinator(["--resume", str(run_dir)], log)  # exactly as documented
                assert proc.wait(600) == 0, log.read_text()[-4000:]
                after = load_record(run_dir / "broker")
                assert after is not None and (after.host, after.port) == (first.host, first.port)
                assert Path(first.config or "").read_bytes() == config_before, "the resume rewrote the config"
                if crash == "broker":
                    assert after.pid != first.pid  # restarted from the same config
                    pids.append(after.pid)  # type: ignore[arg-type]
                else:
                    assert after.pid == first.pid  # adopted
            else:
                assert proc.wait(600) == 0, log.read_text()[-4000:]
            codes = agents.wait(120)
            assert set(codes.values()) == {0}, {a: agents.log(a) for a in codes}
            for pid in pids:
                assert dead(pid), f"broker pid {pid} was left running"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            for pid in pids:  # never leave our brokers behind, even when the test failed
                if not dead(pid):
                    os.kill(pid, signal.SIGKILL)
    return run_dir


def assert_complete_outputs(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS
    assert [entry["round"] for entry in summary["per_round"]] == list(range(1, ROUNDS + 1))
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({(int(r["round"]), r["agent_id"]) for r in rows}) == [
        (round_id, agent) for round_id in range(1, ROUNDS + 1) for agent in sorted(PINS)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return federation(tmp_path_factory.mktemp("reference"), crash=None)


def assert_same_tensors(got_dir: Path, want_dir: Path) -> None:
    """Bit for bit: each agent trains with a per-round seed on one thread and each round sums two updates (float
    addition of two terms does not depend on arrival order), so a resumed run repeats the interrupted round exactly
    (measured: max abs difference 0 on all 45 tensors of rounds 2 and 3)."""
    for round_id in range(2, ROUNDS + 1):
        got = load_state(got_dir / "tensors" / f"round-{round_id:04d}.safetensors")
        want = load_state(want_dir / "tensors" / f"round-{round_id:04d}.safetensors")
        assert set(got.global_tensors) == set(want.global_tensors) and got.global_tensors
        assert set(got.group_tensors) == set(want.group_tensors)
        for name, value in want.global_tensors.items():
            np.testing.assert_array_equal(got.global_tensors[name], value, err_msg=name)
        for group, tensors in want.group_tensors.items():
            for name, value in tensors.items():
                np.testing.assert_array_equal(got.group_tensors[group][name], value, err_msg=f"{group}/{name}")


def test_resume_after_kill_9_reuses_the_runs_broker(tmp_path: Path, reference: Path) -> None:
    run_dir = federation(tmp_path, crash="coordinator")
    assert_complete_outputs(run_dir)
    assert_same_tensors(run_dir, reference)
    assert_rounds_follow_the_rule(run_dir, PINS)


def test_resume_restarts_the_runs_broker_if_it_died(tmp_path: Path, reference: Path) -> None:
    run_dir = federation(tmp_path, crash="broker")
    assert_complete_outputs(run_dir)
    assert_same_tensors(run_dir, reference)
    assert_rounds_follow_the_rule(run_dir, PINS)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_the_runs_broker(tmp_path: Path, sig: signal.Signals) -> None:
    run_dir = tmp_path / "run"
    proc = coordinator(["--config", str(write_config(tmp_path / "run.toml")), "--out", str(run_dir)],
                       tmp_path / "coordinator.log")
    try:
        record = recorded_broker(run_dir)
        assert record.pid is not None and mosquitto_pid_running(record.pid, Path(record.config or ""))
        proc.send_signal(sig)
        assert proc.wait(30) != 0
        wait_for(lambda: dead(record.pid or 0), 10, "the broker to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop_recorded_broker(run_dir)  # only if the test failed before the coordinator stopped it


def test_an_error_stops_the_runs_broker(tmp_path: Path) -> None:
    """The run fails (no agent joins within join_timeout_s): the coordinator exits non-zero and its broker is gone."""
    run_dir, log = tmp_path / "run", tmp_path / "coordinator.log"
    config = write_config(tmp_path / "run.toml")
    config.write_text(config.read_text().replace("join_timeout_s = 180", "join_timeout_s = 2"))
    proc = coordinator(["--config", str(config), "--out", str(run_dir)], log)
    try:
        record = recorded_broker(run_dir)
        assert proc.wait(120) != 0
        assert "no agent joined within 2 s" in log.read_text()
        wait_for(lambda: dead(record.pid or 0), 10, "the broker to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop_recorded_broker(run_dir)


def test_an_open_broker_without_passwords_is_refused_unless_insecure(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", "--config",
                             str(write_config(tmp_path / "run.toml")), "--out", str(run_dir), "--listen", "0.0.0.0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--insecure" in result.stderr and "coordinator provision" in result.stderr
    assert not run_dir.exists()  # refused before anything was written



def test_resume_without_a_recorded_broker_says_what_to_do(tmp_path: Path) -> None:
    """A run directory that records no broker (e.g. from an older version): exit 2 naming --broker, no traceback."""
    from coordinator.config import RunConfig
    from coordinator.store import RunStore

    run_dir = tmp_path / "run"
    store = RunStore(run_dir)
    store.set_meta("config", RunConfig(backbones=("tiny-3",)).model_dump(mode="json"))
    store.set_meta("run_id", "old-run")
    store.close()
    result = subprocess.run([sys.executable, "-m", "coordinator.cli", "run", "--resume", str(run_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "records no broker" in result.stderr and "--broker HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr
