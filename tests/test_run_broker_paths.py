"""A run directory given as a relative path (`coordinator run` defaults to --out runs/run): its own broker must
still be recognised, adopted and restarted from any working directory.

Found by the chaos soak (bench/chaos_soak.py): with a relative run directory mosquitto was started as
``mosquitto -c runs/.../mosquitto.conf`` while broker.json recorded the absolute path, so a resume did not
recognise the still-running broker (it started a second one on the same port and left the first running for
ever), and the config's relative log and persistence paths pointed elsewhere when started from another cwd.
Real mosquitto, real processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coordinator.broker import mosquitto_pid_running, probe_mqtt
from coordinator.run_broker import load_record, run_broker


def test_a_relative_run_directorys_broker_is_adopted_by_a_resume_from_elsewhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    with run_broker(Path("runs/run/broker"), address=None, resume=False) as first:
        assert first.pid is not None and first.config is not None
        config = Path(first.config)
        assert config.is_absolute()
        assert mosquitto_pid_running(first.pid, config), "the run's own broker is not recognised by its record"
        for line in config.read_text().splitlines():  # every path the broker writes to is absolute
            if line.startswith(("log_dest file", "persistence_location")):
                assert Path(line.split()[-1]).is_absolute(), line
        monkeypatch.chdir(tmp_path / "elsewhere")  # the coordinator was killed; the resume runs from another cwd
        with run_broker(tmp_path / "start" / "runs" / "run" / "broker", address=None, resume=True) as resumed:
            assert resumed.pid == first.pid, "a resume started a second broker instead of adopting the running one"
            assert probe_mqtt(resumed.host, resumed.port)
        assert not _running(first.pid), "the adopted broker was not stopped when the resumed run ended"
        assert not list((tmp_path / "elsewhere").iterdir()), "the broker wrote into the resume's working directory"


def test_a_relative_run_directorys_dead_broker_restarts_from_another_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    with run_broker(Path("runs/run/broker"), address=None, resume=False) as first:
        port = first.port
    broker_dir = tmp_path / "start" / "runs" / "run" / "broker"
    monkeypatch.chdir(tmp_path / "elsewhere")
    with run_broker(broker_dir, address=None, resume=True) as restarted:
        assert restarted.port == port and restarted.pid is not None and restarted.pid != first.pid
        assert probe_mqtt(restarted.host, restarted.port)
        record = load_record(broker_dir)
        assert record is not None and record.pid == restarted.pid
        assert mosquitto_pid_running(restarted.pid, Path(record.config or ""))
    assert not _running(restarted.pid)
    starts = (broker_dir / "mosquitto.log").read_text().count(" starting")
    assert starts == 2, f"the restarted broker did not log into the run's broker directory ({starts} starts logged)"
    assert not list((tmp_path / "elsewhere").iterdir()), "the broker wrote into the resume's working directory"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X") and os.path.exists(f"/proc/{pid}")
